"""Does a token-reward source point at the right tokens? The figures of ``treg audit``.

Plain functions over rows: each row holds ``chosen_token_rewards`` / ``rejected_token_rewards``
(``r_hat``, one value per response token) and may hold ground truth ``chosen_marks`` /
``rejected_marks`` (the annotated value of each token, NaN where no span covers it; see
:meth:`treg_lightning.rewards.spans.SpanRewards.response_marks`).

With ground truth (computed on the *annotated responses*, those with at least one mark):

- ``auroc_negative``: AUROC of ``-r_hat`` separating negatively marked tokens from unmarked
  tokens of the same responses (responses with both kinds), pooled; 0.5 is chance, 1 means every
  marked token has a lower ``r_hat`` than every unmarked one; ``auroc_positive`` likewise for
  ``r_hat`` and positive marks;
- ``precision_at_k``: the share of negatively marked tokens among the ``k`` tokens with the
  lowest ``r_hat`` of the annotated responses (``k`` defaults to the number of negatively
  marked tokens, which makes it the R-precision; chance is the share of marked tokens);

always:

- ``pair_agreement``: the share of pairs whose mean ``r_hat`` is higher on the chosen response
  (ties count one half);
- ``near_zero``: the share of tokens with ``|r_hat| < near_zero_below``;
- ``histogram``: counts of ``r_hat`` in equal bins over [-0.5, 0.5];
- ``disagreeing``: the positions of the pairs whose mean ``r_hat`` favours the rejected response
  the most (mean rejected minus mean chosen, largest first);
- with a second source (``second`` rows): ``spearman``, the rank correlation of the two sources
  over all response tokens (stability under paraphrase of the template, or agreement of sources).

Each figure comes with a 95% percentile bootstrap interval over pairs (resampled with
replacement, seeded). :func:`write_report` writes ``audit.md``, ``audit.json`` and the PNGs.
"""

from __future__ import annotations

import errno
import json
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from treg_lightning.pairs import SIDES, field

REPORT_FILES = ("audit.md", "audit.json", "audit_histogram.png", "audit_disagreeing.png")


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve of ``scores`` for boolean ``labels`` (ties count one half): the
    Mann-Whitney U over the number of (positive, negative) pairs; NaN without both classes."""
    scores = np.asarray(scores, np.float64)
    labels = np.asarray(labels, bool)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return math.nan
    ranks = rankdata(scores)
    u = ranks[labels].sum() - n_pos * (n_pos + 1) / 2
    return float(u / (n_pos * n_neg))


def rankdata(values: np.ndarray) -> np.ndarray:
    """1-based ranks, ties given their average rank."""
    values = np.asarray(values, np.float64)
    order = np.argsort(values, kind="mergesort")
    sorted_values = values[order]
    boundaries = np.flatnonzero(np.diff(sorted_values)) + 1
    starts = np.concatenate([[0], boundaries])
    ends = np.concatenate([boundaries, [len(values)]])
    average = (starts + ends + 1) / 2  # mean of the ranks starts+1 .. ends
    ranks = np.empty(len(values))
    ranks[order] = np.repeat(average, ends - starts)
    return ranks


def precision_at_k(scores: np.ndarray, labels: np.ndarray, k: int) -> float:
    """Share of ``labels`` among the ``k`` highest ``scores`` (a stable sort: on a tie, the
    earlier token first); NaN for ``k < 1``."""
    if k < 1 or len(scores) == 0:
        return math.nan
    top = np.argsort(-np.asarray(scores, np.float64), kind="mergesort")[:k]
    return float(np.asarray(labels, bool)[top].mean())


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation (Pearson's of the average ranks); NaN if one is constant."""
    ra, rb = rankdata(a), rankdata(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denominator = math.sqrt(float((ra * ra).sum() * (rb * rb).sum()))
    return float((ra * rb).sum() / denominator) if denominator > 0 else math.nan


def _rewards(row: Mapping[str, Any], side: str) -> np.ndarray:
    return np.asarray(row[field(side, "token_rewards")], np.float64)


def _marks(row: Mapping[str, Any], side: str) -> np.ndarray | None:
    marks = row.get(field(side, "marks"))
    return None if marks is None else np.asarray(marks, np.float64)


class _Pairs:
    """Per-pair arrays, so a bootstrap resample is a concatenation of picked pairs."""

    def __init__(self, rows: Sequence[Mapping[str, Any]], second) -> None:
        self.means = np.array(
            [[_rewards(r, s).mean() if len(_rewards(r, s)) else 0.0 for s in SIDES] for r in rows]
        )
        self.tokens = [np.concatenate([_rewards(r, s) for s in SIDES]) for r in rows]
        self.annotated = []  # per pair: (r_hat, marks) of its annotated responses
        for row in rows:
            parts = [
                (_rewards(row, s), m)
                for s in SIDES
                if (m := _marks(row, s)) is not None and np.isfinite(m).any()
            ]
            self.annotated.append(parts)
        self.second = (
            None
            if second is None
            else [np.concatenate([_rewards(r, s) for s in SIDES]) for r in second]
        )

    def metrics(self, picks: np.ndarray, k: int | None, near_zero_below: float) -> dict:
        means = self.means[picks]
        out = {
            "pair_agreement": float(
                np.mean((means[:, 0] > means[:, 1]) + 0.5 * (means[:, 0] == means[:, 1]))
            ),
            "near_zero": float(np.mean(np.abs(self._cat(self.tokens, picks)) < near_zero_below)),
        }
        annotated = [part for p in picks for part in self.annotated[p]]
        if annotated:
            out.update(_mark_metrics(annotated, k))
        if self.second is not None:
            out["spearman"] = spearman(self._cat(self.tokens, picks), self._cat(self.second, picks))
        return out

    @staticmethod
    def _cat(arrays, picks) -> np.ndarray:
        return np.concatenate([arrays[p] for p in picks]) if len(picks) else np.zeros(0)


def _mark_metrics(responses: list[tuple[np.ndarray, np.ndarray]], k: int | None) -> dict:
    def pooled(sign: Callable[[np.ndarray], np.ndarray], flip: float) -> float:
        scores, labels = [], []
        for rewards, marks in responses:
            marked, unmarked = sign(marks), np.isnan(marks)
            if marked.any() and unmarked.any():
                keep = marked | unmarked
                scores.append(flip * rewards[keep])
                labels.append(marked[keep])
        if not scores:
            return math.nan
        return auroc(np.concatenate(scores), np.concatenate(labels))

    def negative(m):
        return np.nan_to_num(m, nan=0.0) < 0

    def positive(m):
        return np.nan_to_num(m, nan=0.0) > 0

    rewards = np.concatenate([r for r, _ in responses])
    is_negative = np.concatenate([negative(m) for _, m in responses])
    top = int(is_negative.sum()) if k is None else k
    return {
        "auroc_negative": pooled(negative, -1.0),
        "auroc_positive": pooled(positive, 1.0),
        "precision_at_k": precision_at_k(-rewards, is_negative, top),
        "k": top,
        "negative_share": float(is_negative.mean()),  # precision_at_k of a random ranking
    }


def audit_rows(
    rows: Sequence[Mapping[str, Any]],
    *,
    second: Sequence[Mapping[str, Any]] | None = None,
    k: int | None = None,
    near_zero_below: float = 0.01,
    bins: int = 20,
    disagreeing: int = 4,
    bootstrap: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """The audit figures of ``rows`` (see the module docstring).

    Args:
        rows: pairs with ``{side}_token_rewards`` and optionally ``{side}_marks``.
        second: the same pairs (same order, same tokens) under a second source, for the rank
            correlation; None: none.
        k: tokens of ``precision_at_k``; None: the number of negatively marked tokens.
        near_zero_below: ``|r_hat|`` below which a reward counts as near zero.
        bins: histogram bins over [-0.5, 0.5].
        disagreeing: how many of the most disagreeing pairs to list.
        bootstrap: resamples over pairs for the 95% intervals (0: no intervals).
        seed: seed of the resampling.

    Returns:
        ``{"pairs", "tokens", "metrics": {name: {"value", "low", "high"}}, "histogram":
        {"edges", "counts"}, "disagreeing": [positions], "settings"}``; JSON-serializable.
    """
    if not rows:
        raise ValueError("audit_rows needs at least one pair.")
    if second is not None and len(second) != len(rows):
        raise ValueError(f"second has {len(second)} pairs, rows {len(rows)}.")
    pairs = _Pairs(rows, second)
    everything = np.arange(len(rows))
    point = pairs.metrics(everything, k, near_zero_below)
    top_k = point.pop("k", None)
    samples: dict[str, list[float]] = {name: [] for name in point}
    rng = np.random.default_rng(seed)
    for _ in range(bootstrap):
        picks = rng.integers(0, len(rows), len(rows))
        resampled = pairs.metrics(picks, k, near_zero_below)  # k=None: R-precision each time
        for name in samples:
            samples[name].append(resampled.get(name, math.nan))
    metrics = {}
    for name, value in point.items():
        drawn = np.asarray(samples[name], np.float64)
        drawn = drawn[np.isfinite(drawn)]
        low, high = np.percentile(drawn, [2.5, 97.5]) if len(drawn) else (math.nan, math.nan)
        metrics[name] = {"value": _num(value), "low": _num(low), "high": _num(high)}
    tokens = pairs._cat(pairs.tokens, everything)
    counts, edges = np.histogram(np.clip(tokens, -0.5, 0.5), bins=bins, range=(-0.5, 0.5))
    gap = pairs.means[:, 1] - pairs.means[:, 0]
    order = np.argsort(-gap, kind="mergesort")[:disagreeing]
    return {
        "pairs": len(rows),
        "tokens": int(len(tokens)),
        "metrics": metrics,
        "k": top_k,
        "histogram": {"edges": edges.tolist(), "counts": counts.tolist()},
        "disagreeing": [int(i) for i in order if gap[i] > 0],
        "settings": {"near_zero_below": near_zero_below, "bootstrap": bootstrap, "seed": seed},
    }


def _num(value) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


def audit_split(
    datamodule, split: str, second=None, **settings
) -> tuple[dict[str, Any], list[dict]]:
    """:func:`audit_rows` of one split of a :class:`~treg_lightning.data.PreferenceDataModule`
    under its ``rewards`` (cache built or reused), ground truth from the data's spans, and the
    served rows (for the heat map). ``settings`` go to :func:`audit_rows`."""
    from treg_lightning.errors import ConfigError
    from treg_lightning.rewards.spans import SpanRewards

    if datamodule.rewards is None:
        raise ConfigError(
            "treg audit needs token rewards: data.rewards is null. Set it to a source (e.g. "
            "treg_lightning.rewards.ContrastiveRewards or SpanRewards)."
        )
    tokenized = datamodule.tokenized_rows()
    if split not in tokenized:
        raise ConfigError(
            f"treg audit --split {split}: the data has no {split} split (it has "
            f"{', '.join(tokenized)}); configure data.val_source / data.test_source or pick one."
        )
    rows = tokenized[split]
    served = [dict(row) for row in datamodule.serve(split, rows)]
    datamodule.rewards.release()
    truth = SpanRewards()
    for row, out in zip(rows, served, strict=True):
        for side in SIDES:
            if row.get(field(side, "spans")) or row.get(field(side, "pieces")):
                marks = truth.response_marks(row, side, datamodule.tokenizer)
                out[field(side, "marks")] = marks.tolist()
    other = None
    if second is not None:
        other = [dict(row) for row in datamodule.serve(split, rows, second)]
        second.release()
    return audit_rows(served, second=other, **settings), served


# --- the report --------------------------------------------------------------------------------

LABELS = {
    "auroc_negative": "AUROC of -r_hat, negatively marked vs unmarked tokens",
    "auroc_positive": "AUROC of r_hat, positively marked vs unmarked tokens",
    "precision_at_k": "precision at the k most negative tokens",
    "negative_share": "share of negatively marked tokens (precision of a random ranking)",
    "pair_agreement": "pairs whose mean r_hat prefers the chosen response",
    "near_zero": "share of tokens with abs(r_hat) below the near-zero threshold",
    "spearman": "Spearman rank correlation with the second source, per token",
}


def check_report_folder(output_dir: str | Path) -> None:
    """Refuse a folder that already holds an audit report (checked before any work)."""
    from treg_lightning.outputs import OutputFolderError

    for name in REPORT_FILES:
        path = Path(output_dir) / name
        if path.exists():
            raise OutputFolderError(
                errno.EEXIST,
                f"{path} exists: audit never writes over a report. Choose another --output_dir "
                "or move the old report away.",
            )


def markdown(result: Mapping[str, Any], title: str = "Token-reward audit") -> str:
    """The report as Markdown: the figures with their 95% intervals, then the histogram."""

    def fmt(x) -> str:
        return "n/a" if x is None else f"{x:.3f}"

    lines = [
        f"# {title}",
        "",
        f"{result['pairs']} pairs, {result['tokens']} response tokens; 95% intervals: "
        f"bootstrap over pairs ({result['settings']['bootstrap']} resamples, seed "
        f"{result['settings']['seed']}).",
        "",
        "| figure | value | 95% interval |",
        "|---|---|---|",
    ]
    for name, m in result["metrics"].items():
        label = LABELS.get(name, name)
        if name == "precision_at_k":
            label += f" (k = {result['k']})"
        if name == "near_zero":
            label += f" ({result['settings']['near_zero_below']})"
        lines.append(f"| {label} | {fmt(m['value'])} | [{fmt(m['low'])}, {fmt(m['high'])}] |")
    edges, counts = result["histogram"]["edges"], result["histogram"]["counts"]
    lines += ["", "## r_hat histogram", "", "| bin | tokens |", "|---|---|"]
    lines += [
        f"| [{a:+.2f}, {b:+.2f}) | {c} |" for a, b, c in zip(edges, edges[1:], counts, strict=False)
    ]
    lines += [
        "",
        "Pairs whose mean r_hat favours the rejected response most (positions): "
        + (", ".join(map(str, result["disagreeing"])) or "none"),
        "",
    ]
    return "\n".join(lines)


def write_report(
    result: Mapping[str, Any],
    output_dir: str | Path,
    rows: Sequence[Mapping[str, Any]] | None = None,
    tokenizer=None,
) -> dict[str, Path]:
    """``audit.md``, ``audit.json`` and (matplotlib installed) the histogram and the heat map of
    the most disagreeing pairs (needs ``rows`` with ids and ``tokenizer``); never overwrites."""
    output_dir = Path(output_dir)
    check_report_folder(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = {"markdown": output_dir / "audit.md", "json": output_dir / "audit.json"}
    paths["json"].write_text(json.dumps(result, indent=1))
    paths["markdown"].write_text(markdown(result))
    try:
        from matplotlib.figure import Figure
    except ImportError:  # the `plots` extra is not installed: tables only
        return paths
    fig = Figure(figsize=(6, 3), dpi=120)
    ax = fig.add_subplot()
    edges, counts = result["histogram"]["edges"], result["histogram"]["counts"]
    ax.bar(edges[:-1], counts, width=np.diff(edges), align="edge", color="#4a7bb7")
    ax.set_xlabel("r_hat")
    ax.set_ylabel("tokens")
    fig.tight_layout()
    paths["histogram"] = output_dir / "audit_histogram.png"
    fig.savefig(paths["histogram"])
    if rows is not None and tokenizer is not None and result["disagreeing"]:
        from treg_lightning.rewards.render_png import render_heatmap_png

        picked = [rows[i] for i in result["disagreeing"]]
        paths["heatmap"], _ = render_heatmap_png(
            picked, tokenizer, output_dir / "audit_disagreeing.png", n=len(picked)
        )
    return paths
