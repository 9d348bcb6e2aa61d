"""Token-reward heat map: one self-contained HTML page (inline CSS and a tiny inline script, no
network).

Each pair shows its prompt as chat turns with role labels (special tokens such as
``<|im_start|>`` are read as turn boundaries, never printed), then the chosen and the rejected
response side by side, every token coloured by its reward ``r_hat`` on a diverging scale (red:
negative, white: 0, blue: positive; symmetric, set by the largest ``|r_hat|`` shown; a legend
on top) with its value printed under it (a checkbox hides the numbers). Each pair's header gives
the mean ``r_hat`` of both responses and their difference ``delta = mean(chosen) -
mean(rejected)``; a menu sorts the pairs by it (lowest first: where the evaluator's token
rewards disagree most with the preference label).

The PNG version of the same view is :mod:`treg_lightning.rewards.render_png`.
"""

from __future__ import annotations

import html
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from treg_lightning.pairs import SIDES, field

_NEGATIVE = (178, 24, 43)  # red end of the diverging scale (ColorBrewer RdBu)
_POSITIVE = (33, 102, 172)  # blue end
# Words that name a chat role when a template writes them after a turn marker.
ROLE_WORDS = ("system", "user", "assistant", "human", "model", "bot", "tool", "developer")
# Literal turn markers of templates whose markers are plain text (e.g. "<|user|>").
_LITERAL_MARKER = re.compile(r"<\|([A-Za-z_]+)\|>")

# Cache columns: the contract's name first, the old one (caches of format 1) second.
_REWARD_COLUMNS = {side: (field(side, "token_rewards"), f"{side}_rewards") for side in SIDES}


def token_rewards(row: Mapping[str, Any], side: str) -> list[float]:
    """The per-token rewards ``r_hat`` of one side of a cache row (either column name)."""
    for column in _REWARD_COLUMNS[side]:
        if column in row:
            return [float(r) for r in row[column]]
    raise KeyError(f"the row has no {' / '.join(_REWARD_COLUMNS[side])} column")


def has_token_rewards(column_names: Iterable[str]) -> bool:
    """Whether a cache with these columns carries token rewards."""
    names = set(column_names)
    return all(any(c in names for c in _REWARD_COLUMNS[side]) for side in SIDES)


def reward_color(reward: float, scale: float) -> str:
    """CSS colour of ``reward`` on the red-white-blue scale spanning ``[-scale, scale]``."""
    r, g, b = reward_rgb(reward, scale)
    return f"rgb({r},{g},{b})"


def reward_rgb(reward: float, scale: float) -> tuple[int, int, int]:
    a = min(abs(reward) / scale, 1.0) if scale > 0 else 0.0
    end = _POSITIVE if reward > 0 else _NEGATIVE
    return tuple(round(255 + (c - 255) * a) for c in end)


def dark_background(reward: float, scale: float) -> bool:
    """True where white text reads better than black (the saturated ends of the scale)."""
    return scale > 0 and abs(reward) / scale > 0.6


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


def special_ids(tokenizer) -> set[int]:
    ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    decoder = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    ids.update(i for i, token in decoder.items() if getattr(token, "special", False))
    return ids


def prompt_turns(tokenizer, prompt_ids: Sequence[int]) -> list[tuple[str, str]]:
    """``[(role, text)]`` of chat-template prompt ids: special tokens and ``<|role|>`` markers
    are turn boundaries; a role word on the first line after a marker names the turn
    (ChatML ``<|im_start|>user``, Llama-3 headers, Gemma ``<start_of_turn>model``)."""
    specials = special_ids(tokenizer)
    pieces: list[tuple[bool, str]] = []  # (is_marker, text)
    run: list[int] = []
    for token in list(prompt_ids) + [None]:
        if token is None or token in specials:
            if run:
                text = tokenizer.decode(run)
                for i, part in enumerate(_LITERAL_MARKER.split(text)):
                    pieces.append((i % 2 == 1, part))
                run = []
            if token is not None:
                name = tokenizer.convert_ids_to_tokens(token)
                pieces.append((True, name.strip("<|>▁ ").lower()))
        else:
            run.append(token)
    turns: list[tuple[str, str]] = []
    role, text, after_marker = "", [], True
    for is_marker, value in pieces:
        if is_marker and value.lower() in ROLE_WORDS:
            turns.append((role, "".join(text)))
            role, text, after_marker = value.lower(), [], False
        elif is_marker:
            after_marker = True
        else:
            head, newline, rest = value.partition("\n")
            if after_marker and head.strip().lower() in ROLE_WORDS:
                turns.append((role, "".join(text)))
                role, text = head.strip().lower(), [rest if newline else ""]
            else:
                text.append(value)
            after_marker = False
    turns.append((role, "".join(text)))
    # Text before any role marker: the start of a prompt cut to max_prompt_length.
    return [(r or "…", t.strip()) for r, t in turns if t.strip()]


def _mean(values: Sequence[float]) -> float:
    return sum(values) / max(len(values), 1)


def short_value(value: float) -> str:
    """``+0.123`` as ``+.12``: the number under a token (exact value on hover)."""
    text = f"{value:+.2f}"
    return text.replace("0.", ".", 1) if abs(value) < 1 else text


def _token_html(piece: str, reward: float, scale: float, special: bool) -> str:
    shown = "end" if special else piece.replace("\n", "↵")
    classes = "t dark" if dark_background(reward, scale) else "t"
    classes += " sp" if special else ""
    span = (
        f'<span class="{classes}" style="background:{reward_color(reward, scale)}" '
        f'title="{reward:+.4f}"><span class="p">{html.escape(shown) or "&#8203;"}</span>'
        f'<span class="v">{short_value(reward)}</span></span>'
    )
    return span + "<br>" * piece.count("\n")


def _side_html(tokenizer, side: str, ids, rewards, scale: float) -> str:
    specials = special_ids(tokenizer)
    pieces = token_pieces(tokenizer, ids)
    tokens = "".join(
        _token_html(piece, reward, scale, token in specials)
        for token, piece, reward in zip(ids, pieces, rewards, strict=True)
    )
    return (
        f'<div class="side {side}"><h3><span class="name">{side}</span> '
        '<span class="meta">mean r&#770; '
        f"<b>{_mean(rewards):+.4f}</b> &middot; {len(rewards)} tokens</span></h3>"
        f'<div class="tokens">{tokens}</div></div>'
    )


def _pair_html(tokenizer, row: Mapping[str, Any], position: int, scale: float) -> str:
    rewards = {side: token_rewards(row, side) for side in SIDES}
    means = {side: _mean(values) for side, values in rewards.items()}
    delta = means["chosen"] - means["rejected"]
    turns = "".join(
        f'<div class="turn"><span class="role role-{html.escape(role)}">{html.escape(role)}'
        f'</span><div class="content">{html.escape(text)}</div></div>'
        for role, text in prompt_turns(tokenizer, row["prompt_ids"])
    )
    sides = "".join(
        _side_html(tokenizer, side, row[f"{side}_ids"], rewards[side], scale) for side in SIDES
    )
    return (
        f'<section class="pair" data-order="{position}" data-delta="{delta:.6f}">'
        f'<h2>Pair {row.get("index", position)}<span class="meta">mean r&#770; chosen '
        f"<b>{means['chosen']:+.4f}</b> &middot; rejected <b>{means['rejected']:+.4f}</b> "
        f"&middot; &Delta; <b>{delta:+.4f}</b></span></h2>"
        f'<div class="prompt">{turns}</div><div class="sides">{sides}</div></section>'
    )


def _legend_html(scale: float) -> str:
    stops = ", ".join(reward_color(scale * x / 4, scale) for x in range(-4, 5))
    ticks = "".join(f"<span>{scale * x / 2:+.2f}</span>" for x in range(-2, 3))
    return (
        '<div class="legend"><div><div class="bar" style="background:linear-gradient(to right, '
        f'{stops})"></div><div class="ticks">{ticks}</div></div><p>token reward r&#770; = '
        "sigmoid(log p(token | better context) &minus; log p(token | worse context)) &minus; "
        '0.5: <b style="color:rgb(33,102,172)">blue</b> where the evaluator\'s contrastive '
        'prompts favour the token, <b style="color:rgb(178,24,43)">red</b> where they '
        "disfavour it. The number under each token is its r&#770; (exact on hover).</p></div>"
    )


_SCRIPT = """
const pairs = document.getElementById('pairs');
const sorts = {
  data: (a, b) => a.dataset.order - b.dataset.order,
  asc: (a, b) => a.dataset.delta - b.dataset.delta,
  desc: (a, b) => b.dataset.delta - a.dataset.delta,
};
const order = document.getElementById('order');
const sortPairs = () => {
  [...pairs.children].sort(sorts[order.value]).forEach((p) => pairs.appendChild(p));
};
order.addEventListener('change', sortPairs);
// page.html#asc opens sorted (a link to the most disagreeing pairs)
if (sorts[location.hash.slice(1)]) { order.value = location.hash.slice(1); sortPairs(); }
document.getElementById('values').addEventListener('change', (e) => {
  document.body.classList.toggle('novalues', !e.target.checked);
});
"""

_CSS = """
body { font-family: system-ui, sans-serif; margin: 1.5em 2em; color: #222; }
header { position: sticky; top: 0; background: #fff; padding: .3em 0 .6em;
         border-bottom: 1px solid #ddd; z-index: 1; }
h1 { font-size: 1.3em; margin: 0 0 .4em; }
.controls { display: flex; gap: 1.5em; align-items: center; font-size: .9em; }
.legend { display: flex; gap: 1.5em; align-items: flex-start; margin-top: .5em; }
.legend p { margin: 0; font-size: .8em; max-width: 60em; color: #444; }
.bar { width: 320px; height: .9em; border: 1px solid #999; }
.ticks { display: flex; justify-content: space-between; width: 320px; font-size: .75em; }
.pair { border: 1px solid #ccc; border-radius: 6px; padding: .6em 1em 1em; margin: 1em 0; }
h2 { font-size: 1em; margin: 0 0 .5em; }
.meta { font-weight: normal; color: #555; margin-left: 1em; font-size: .9em; }
.prompt { background: #f6f6f6; border-radius: 4px; padding: .4em .6em; font-size: .9em; }
.turn { display: flex; gap: .6em; margin: .2em 0; }
.role { flex: none; width: 6.5em; text-align: right; font-size: .75em; font-weight: 600;
        text-transform: uppercase; color: #666; padding-top: .15em; }
.role-user { color: #8a5a00; } .role-system { color: #555; } .role-assistant { color: #215a9c; }
.content { white-space: pre-wrap; }
.sides { display: grid; grid-template-columns: 1fr 1fr; gap: 1.2em; margin-top: .6em; }
h3 { font-size: .95em; margin: .2em 0 .4em; } h3 .name { text-transform: capitalize; }
.chosen h3 { color: #1d5e20; } .rejected h3 { color: #8b1a1a; }
.tokens { font-family: ui-monospace, "DejaVu Sans Mono", monospace; font-size: .85em;
          line-height: 1.1; }
.t { display: inline-flex; flex-direction: column; align-items: stretch; margin: 0 0 3px;
     vertical-align: top; border-radius: 2px; }
.t .p { white-space: pre; padding: 1px 0; }
.t .v { font-size: .62em; color: #333; text-align: center; padding: 0 1px; }
.t.dark .p, .t.dark .v { color: #fff; }
.t.sp .p { font-size: .75em; font-variant: small-caps; padding: 2px 3px; border: 1px dashed #888; }
.novalues .t .v { display: none; }
"""


def render_heatmap(
    rows: Iterable[Mapping[str, Any]], tokenizer, path: str | Path, n: int = 20
) -> Path:
    """Write an HTML heat map of the first ``n`` cache rows to ``path``.

    Args:
        rows: token-reward cache rows (``prompt_ids``, ``chosen_ids``, ``rejected_ids``,
            ``chosen_token_rewards`` / ``rejected_token_rewards`` or the older
            ``chosen_rewards`` / ``rejected_rewards``; ``index`` if present).
        tokenizer (transformers.PreTrainedTokenizerBase): the tokenizer that produced the ids.
        path: output ``.html`` file.
        n: number of pairs shown.

    Returns:
        The path written.
    """
    shown = [row for _, row in zip(range(n), rows, strict=False)]
    scale = max((abs(r) for row in shown for s in SIDES for r in token_rewards(row, s)),
                default=0.0)  # fmt: skip
    pairs = "".join(_pair_html(tokenizer, row, j, scale) for j, row in enumerate(shown))
    controls = (
        '<div class="controls"><label>order <select id="order">'
        '<option value="data">data order</option>'
        '<option value="asc">&Delta; mean r&#770; (chosen &minus; rejected), lowest first'
        "</option>"
        '<option value="desc">&Delta; mean r&#770;, highest first</option></select></label>'
        '<label><input type="checkbox" id="values" checked> numbers under tokens</label>'
        f"<span>{len(shown)} pairs</span></div>"
    )
    page = (
        '<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>Token rewards</title>'
        f"<style>{_CSS}</style></head><body><header><h1>Token rewards r&#770;</h1>{controls}"
        f'{_legend_html(scale)}</header><main id="pairs">{pairs}</main>'
        f"<script>{_SCRIPT}</script></body></html>\n"
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    return path
