"""Plots of the credit experiment (``bench/credit.py``): the credit share per variant (level and
paired difference from DPO, with intervals), the collateral, and heat maps of held-out rejected
responses under two variants side by side."""

from __future__ import annotations

from pathlib import Path

import numpy as np

GROUPS = {"all": "all held-out pairs", "seen": "seen kinds", "unseen": "unseen kind"}


def _bars(ax, by_variant: dict, metric: str, names: list[str], groups: list[str]) -> None:
    """Grouped bars of ``by_variant[name][group][metric]`` with their 95% intervals."""
    width = 0.8 / len(groups)
    for g, group in enumerate(groups):
        m = [by_variant[name][group][metric] for name in names]
        means = np.array([v["mean"] for v in m])
        errors = [means - [v["low"] for v in m], [v["high"] for v in m] - means]
        x = np.arange(len(names)) + (g - 0.5 * (len(groups) - 1)) * width
        ax.bar(x, means, width, yerr=errors, capsize=2, label=GROUPS[group])
    ax.set_xticks(np.arange(len(names)), names, rotation=25, ha="right", fontsize=7)
    ax.legend(fontsize=7)


def credit_share(table: dict, path: Path) -> None:
    """Left: the credit share of each variant (chance level dashed). Right: each variant minus
    DPO, paired, with the decision rule's thresholds (+0.05; the band [-0.02, 0.02])."""
    from matplotlib.figure import Figure

    groups = list(table["chance"])
    names = list(table["levels"])
    fig = Figure(figsize=(13, 4.6), dpi=120)
    left, right = fig.subplots(1, 2)
    _bars(left, table["levels"], "credit_share", names, groups)
    left.axhline(table["chance"]["all"]["mean"], color="grey", lw=0.8, ls="--")
    left.set_title("credit share: sum_D max(0,-d) / sum_R max(0,-d)  (dashed: chance |D|/|R|)",
                   fontsize=9)  # fmt: skip
    paired = [n for n in names if n in table["paired"]]
    _bars(right, table["paired"], "credit_share", paired, groups)
    right.axhline(0, color="black", lw=0.8)
    right.axhline(0.05, color="green", lw=0.8, ls="--")
    right.axhspan(-0.02, 0.02, color="grey", alpha=0.15)
    right.set_title("minus DPO (same seed, same pairs); dashed +0.05, shaded [-0.02, 0.02]",
                    fontsize=9)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path)


def collateral(table: dict, path: Path) -> None:
    """Each variant minus DPO, paired (all held-out pairs): the summed drop over the defect,
    and the mean log-prob change of the other rejected tokens and of the chosen response."""
    from matplotlib.figure import Figure

    names = list(table["paired"])
    panels = (("defect_drop", "defect drop, sum_D -d (nats)"),
              ("rest_change", "mean d, other rejected tokens"),
              ("chosen_change", "mean d, chosen tokens"))  # fmt: skip
    fig = Figure(figsize=(14, 4.4), dpi=120)
    for ax, (metric, title) in zip(fig.subplots(1, 3), panels, strict=True):
        _bars(ax, table["paired"], metric, names, ["all"])
        ax.axhline(0, color="black", lw=0.8)
        ax.set_title(f"{title}: minus DPO", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)


def _pieces(tokenizer, ids) -> list[str]:
    return [tokenizer.decode([i]).replace("\n", "\\n") for i in ids]


def _draw(ax, pieces, values, labels, scale, x0, y0, width, title) -> float:
    """Tokens coloured by ``values`` (red negative, blue positive), defect tokens boxed; returns
    the y below the text (axes in character cells, y downwards)."""
    from matplotlib.patches import Rectangle

    ax.text(x0, y0, title, fontsize=7, fontweight="bold", va="top")
    x, y = x0, y0 + 1.4
    for piece, value, label in zip(pieces, values, labels, strict=True):
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
    """``log pi - log pi_ref`` on the rejected response of ``n`` held-out pairs (different
    kinds where there are), under two variants side by side (one seed); defect tokens boxed."""
    from matplotlib.figure import Figure

    picks, kinds = [], []
    for i, r in enumerate(left):  # one pair per kind first, then the next ones
        if r["kind"] not in kinds and len(picks) < n:
            picks.append(i)
            kinds.append(r["kind"])
    picks += [i for i in range(len(left)) if i not in picks][: n - len(picks)]
    width = 70
    values = [np.asarray(r["delta"]) for rs in (left, right) for r in (rs[i] for i in picks)]
    scale = float(np.percentile(np.abs(np.concatenate(values)), 95)) or 1.0
    rows = [(i, _pieces(tokenizer, left[i]["rejected_ids"])) for i in picks]
    height = sum(3 + 1.3 * (sum(max(len(p), 1) for p in pieces) / width + 2) for _, pieces in rows)
    fig = Figure(figsize=(14, max(3.0, height * 0.16)), dpi=150)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(0, 2 * width + 6)
    ax.set_ylim(height + 4, 0)
    ax.axis("off")
    ax.text(1, 1, f"log pi - log pi_ref on held-out rejected responses (red: lowered, blue: "
            f"raised; colour saturates at |{scale:.2f}|); boxed: the defect span", fontsize=7,
            va="top")  # fmt: skip
    y = 3.0
    for i, pieces in rows:
        bottom = y
        for column, (records, name) in enumerate(((left, left_name), (right, right_name))):
            r = records[i]
            seen = "seen" if r["seen"] else "unseen"
            title = f"{name} | {r['kind']} ({seen} kind) | {r['id']}"
            end = _draw(ax, pieces, r["delta"], r["labels"], scale, 1 + column * (width + 4), y,
                        width, title)  # fmt: skip
            bottom = max(bottom, end)
        y = bottom + 1.0
    fig.savefig(path)
