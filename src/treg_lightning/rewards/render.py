"""Token-reward heat map: one self-contained HTML page (inline CSS, no scripts).

Each pair shows its prompt, then the chosen and the rejected response with every token colored
by its reward ``r_hat`` (red = negative, white = 0, green = positive, on a symmetric scale set by
the largest ``|r_hat|`` shown) and the exact value on hover.
"""

from __future__ import annotations

import html
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from treg_lightning.pairs import SIDES, field

_NEGATIVE = (215, 48, 39)  # red end of the diverging scale
_POSITIVE = (26, 152, 80)  # green end

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em; max-width: 70em; color: #222; }
.pair { border: 1px solid #ccc; border-radius: 6px; padding: 1em; margin-bottom: 1.5em; }
.prompt { background: #f4f4f4; padding: .5em; white-space: pre-wrap; font-size: .9em; }
.resp { font-family: ui-monospace, monospace; white-space: pre-wrap; line-height: 1.6; }
.resp span { border-radius: 2px; }
h3 { margin: .8em 0 .3em; font-size: 1em; }
.legend { display: flex; align-items: center; gap: .5em; margin-bottom: 1.5em; }
.bar { width: 20em; height: 1em; border: 1px solid #999;
       background: linear-gradient(to right, rgb(215,48,39), white, rgb(26,152,80)); }
"""


def reward_color(reward: float, scale: float) -> str:
    """CSS color of ``reward`` on the red-white-green scale spanning ``[-scale, scale]``."""
    a = min(abs(reward) / scale, 1.0) if scale > 0 else 0.0
    end = _POSITIVE if reward > 0 else _NEGATIVE
    r, g, b = (round(255 + (c - 255) * a) for c in end)
    return f"rgb({r},{g},{b})"


def token_pieces(tokenizer, ids: Sequence[int]) -> list[str]:
    """The text each token adds, by incremental decoding. A token that ends inside a multi-byte
    character adds "" and the token completing the character carries all of it."""
    pieces, previous = [], ""
    for i in range(len(ids)):
        text = tokenizer.decode(list(ids[: i + 1]))
        if text.endswith("\ufffd") and i + 1 < len(ids):
            pieces.append("")
            continue
        pieces.append(text[len(previous) :] if text.startswith(previous) else text)
        previous = text
    return pieces


def _response_html(tokenizer, ids, rewards, scale: float) -> str:
    spans = []
    for piece, reward in zip(token_pieces(tokenizer, ids), rewards, strict=True):
        spans.append(
            f'<span style="background:{reward_color(reward, scale)}" '
            f'title="{reward:+.4f}">{html.escape(piece)}</span>'
        )
    return "".join(spans)


def _mean(values: Sequence[float]) -> float:
    return sum(values) / max(len(values), 1)


def render_heatmap(
    rows: Iterable[Mapping[str, Any]], tokenizer, path: str | Path, n: int = 20
) -> Path:
    """Write an HTML heat map of the first ``n`` cache rows to ``path``.

    Args:
        rows: token-reward cache rows (``prompt_ids``, ``chosen_ids``, ``rejected_ids``,
            ``chosen_token_rewards``, ``rejected_token_rewards``; ``index`` if present).
        tokenizer: the tokenizer that produced the ids.
        path: output ``.html`` file.
        n: number of pairs shown.

    Returns:
        The path written.
    """
    shown = [row for _, row in zip(range(n), rows, strict=False)]
    scale = max(
        (abs(r) for row in shown for side in SIDES for r in row[field(side, "token_rewards")]),
        default=0.0,
    )
    body = [
        "<h1>Token rewards</h1>",
        f'<div class="legend"><span>{-scale:+.3f}</span><div class="bar"></div>'
        f"<span>{scale:+.3f}</span><span>(hover a token for its reward)</span></div>",
    ]
    for j, row in enumerate(shown):
        prompt = tokenizer.decode(list(row["prompt_ids"]))
        body.append(f'<div class="pair"><h2>Pair {row.get("index", j)}</h2>')
        body.append(f'<div class="prompt">{html.escape(prompt)}</div>')
        for name in SIDES:
            rewards = [float(r) for r in row[field(name, "token_rewards")]]
            body.append(f"<h3>{name} (mean reward {_mean(rewards):+.4f})</h3>")
            ids = row[f"{name}_ids"]
            body.append(f'<div class="resp">{_response_html(tokenizer, ids, rewards, scale)}</div>')
        body.append("</div>")
    page = (
        '<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>Token rewards</title>'
        f"<style>{_CSS}</style></head><body>{''.join(body)}</body></html>\n"
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    return path
