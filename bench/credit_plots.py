"""Plots of the credit experiment (``bench/credit.py``): AUROC bars, log-prob change bars, and
heat maps of held-out rejected responses under two variants side by side."""

from __future__ import annotations

from pathlib import Path

import numpy as np

CONDITIONS = ("minimal", "non_minimal")


def _bars(ax, results: dict, metric: str, title: str, chance: float | None = None) -> None:
    names = list(results["variants"])
    width = 0.8 / len(CONDITIONS)
    for c, condition in enumerate(CONDITIONS):
        means, lows, highs = [], [], []
        for name in names:
            m = results["variants"][name][condition][metric]
            means.append(m["mean"])
            lows.append(m["mean"] - m["low"])
            highs.append(m["high"] - m["mean"])
        x = np.arange(len(names)) + (c - 0.5 * (len(CONDITIONS) - 1)) * width
        ax.bar(x, means, width, yerr=[lows, highs], capsize=3, label=condition)
    if chance is not None:
        ax.axhline(chance, color="grey", lw=0.8, ls="--")
    ax.set_xticks(np.arange(len(names)), names, rotation=20, ha="right", fontsize=8)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)


def _two_panels(results: dict, path: Path, panels, chance: float) -> None:
    """Two bar panels side by side, ``panels`` = ((metric, title), (metric, title))."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4), dpi=120)
    for ax, (metric, title) in zip(fig.subplots(1, 2), panels, strict=True):
        _bars(ax, results, metric, title, chance)
    fig.tight_layout()
    fig.savefig(path)


def auroc_bars(results: dict, path: Path) -> None:
    panels = (("auroc_delta", "AUROC at defect tokens of -(log pi - log pi_ref)"),
              ("auroc_implicit", "AUROC of -(implicit token reward)"))  # fmt: skip
    _two_panels(results, path, panels, chance=0.5)


def logp_change_bars(results: dict, path: Path) -> None:
    panels = (("defect_change", "mean log pi - log pi_ref, defect tokens"),
              ("rest_change", "mean log pi - log pi_ref, other rejected tokens"))  # fmt: skip
    _two_panels(results, path, panels, chance=0.0)


def _pieces(tokenizer, ids) -> list[str]:
    return [tokenizer.decode([i]).replace("\n", "\\n") for i in ids]


def _draw(ax, pieces, values, labels, scale, x0, y0, width, title) -> float:
    """Tokens coloured by ``values`` (red negative, blue positive), defect tokens boxed; returns
    the y below the text (axes in character cells, y downwards)."""
    from matplotlib.patches import Rectangle

    ax.text(x0, y0, title, fontsize=7, fontweight="bold", va="top")
    x, y = x0, y0 + 1.4
    for piece, value, label in zip(pieces, values, labels):
        n = max(len(piece), 1)
        if x + n > x0 + width:
            x, y = x0, y + 1.3
        strength = min(abs(value) / scale, 1.0) if scale > 0 else 0.0
        color = (1, 1 - strength, 1 - strength) if value < 0 else (1 - strength, 1 - strength, 1)
        ax.add_patch(Rectangle((x, y - 0.1), n, 1.1, facecolor=color,
                               edgecolor="black" if label else "none", lw=0.6))  # fmt: skip
        ax.text(x, y + 0.8, piece, fontsize=5.5, family="monospace")
        x += n
    return y + 2.0


def heatmaps(left: list[dict], right: list[dict], left_name: str, right_name: str, tokenizer,
             path: Path, n: int = 4) -> None:  # fmt: skip
    """``log pi - log pi_ref`` on the rejected response of ``n`` held-out pairs (both
    conditions), under two variants side by side; defect tokens boxed."""
    from matplotlib.figure import Figure

    picks = [i for c in CONDITIONS for i in [j for j, r in enumerate(left)
                                             if r["condition"] == c][: n // 2]]  # fmt: skip
    width = 70
    values = [
        np.asarray(r["rejected_delta"]) for rs in (left, right) for r in (rs[i] for i in picks)
    ]
    scale = float(np.percentile(np.abs(np.concatenate(values)), 95)) or 1.0
    rows = []
    for i in picks:
        ids = left[i]["rejected_ids"]
        rows.append((i, _pieces(tokenizer, ids), len(ids)))
    height = sum(
        3 + 1.3 * (sum(max(len(p), 1) for p in pieces) / width + 2) for _, pieces, _ in rows
    )
    fig = Figure(figsize=(14, max(3.0, height * 0.16)), dpi=150)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(0, 2 * width + 6)
    ax.set_ylim(height + 4, 0)
    ax.axis("off")
    ax.text(1, 1, f"log pi - log pi_ref on held-out rejected responses (red: lowered, blue: "
            f"raised; colour saturates at |{scale:.2f}|); boxed: the defect span", fontsize=7,
            va="top")  # fmt: skip
    y = 3.0
    for i, pieces, length in rows:
        labels = list(left[i]["labels"]) + [0]
        bottom = y
        for column, (records, name) in enumerate(((left, left_name), (right, right_name))):
            r = records[i]
            title = f"{name} | {r['condition']} / {r['kind']} | {r['id']}"
            end = _draw(ax, pieces, r["rejected_delta"], labels, scale, 1 + column * (width + 4),
                        y, width, title)  # fmt: skip
            bottom = max(bottom, end)
        y = bottom + 1.0
    fig.savefig(path)
