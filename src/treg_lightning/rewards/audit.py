"""Does a token-reward source point at the right tokens? The figures of ``treg audit``.

Plain functions over rows: each row holds ``chosen_token_rewards`` / ``rejected_token_rewards``
(``r_hat``, one value per response token) and may hold ground truth ``chosen_marks`` /
``rejected_marks`` (the annotated value of each token, NaN where no span covers it; see
:meth:`treg_lightning.rewards.spans.SpanRewards.response_marks`).

With ground truth, each figure is computed per *response* and averaged over the responses it is
defined for, so an offset between responses (one response's rewards all higher than another's)
counts for nothing; ties count as ties:

- ``auroc_negative``: per response holding both negatively marked and unmarked tokens, the
  AUROC of ``-r_hat`` separating the two: the share of (marked, unmarked) token pairs of that
  response in which the marked token has the lower ``r_hat``, a tie counting one half (a
  constant source scores exactly 0.5); the mean over those responses. ``auroc_positive``
  likewise for ``r_hat`` and positive marks;
- ``precision_at_k``: per response holding a negatively marked token, the share of negatively
  marked tokens among its ``k`` tokens with the lowest ``r_hat`` (``k`` defaults to that
  response's number of negatively marked tokens, the R-precision; a ``k`` above the response's
  length takes all its tokens); tokens tied at the cut are drawn at random, and the figure is
  the expected value of that draw; the mean over those responses;
- ``negative_share``: per such response, the share of its tokens that are negatively marked,
  averaged likewise: the chance level of ``precision_at_k`` (what a constant or random source
  scores);

always:

- ``pair_agreement``: the share of pairs whose mean ``r_hat`` is higher on the chosen response
  (ties count one half);
- ``near_zero``: the share of tokens with ``|r_hat| < near_zero_below``;
- ``histogram``: counts of ``r_hat`` in equal bins over [-0.5, 0.5];
- ``disagreeing``: the positions of the pairs whose mean ``r_hat`` favours the rejected response
  the most (mean rejected minus mean chosen, largest first);
- with a second source (``second`` rows): ``spearman``, the rank correlation of the two sources,
  pooled over all response tokens (stability under paraphrase of the template, or agreement of
  sources).

Each figure comes with a 95% percentile bootstrap interval over pairs (resampled with
replacement, seeded), or none (``None``, "n/a" in the report) when it rests on fewer than two
pairs or ``bootstrap`` is 0. :func:`write_report` writes ``audit.md``, ``audit.json`` and the
PNGs.
"""

from __future__ import annotations

import errno
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from treg_lightning.errors import ConfigError
from treg_lightning.outputs import OutputFolderError
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
    """Share of ``labels`` among the ``k`` highest ``scores``, ties at the cut drawn at random:
    the expected value of that draw (so a constant score gives the share of ``labels``);
    ``k`` above the number of scores takes them all; NaN for ``k < 1`` or no scores."""
    scores = np.asarray(scores, np.float64)
    labels = np.asarray(labels, bool)
    if k < 1 or len(scores) == 0:
        return math.nan
    k = min(k, len(scores))
    cut = np.sort(scores)[::-1][k - 1]  # the k-th highest score
    above, tied = scores > cut, scores == cut
    # All tokens above the cut are taken; the k - |above| others come from the tied ones, each
    # of which is drawn with the same probability.
    hits = labels[above].sum() + (k - above.sum()) * labels[tied].mean()
    return float(hits / k)


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


RESPONSE_FIGURES = ("auroc_negative", "auroc_positive", "precision_at_k", "negative_share")


def response_figures(rewards: np.ndarray, marks: np.ndarray, k: int | None) -> dict[str, float]:
    """The ground-truth figures of one response (those it is defined for; see the module
    docstring): ``rewards`` its ``r_hat``, ``marks`` its annotated values (NaN: unmarked)."""
    rewards = np.asarray(rewards, np.float64)
    marks = np.asarray(marks, np.float64)
    unmarked = np.isnan(marks)
    negative = np.nan_to_num(marks, nan=0.0) < 0
    positive = np.nan_to_num(marks, nan=0.0) > 0
    out = {}
    if negative.any() and unmarked.any():
        keep = negative | unmarked  # tokens marked 0 count in neither class
        out["auroc_negative"] = auroc(-rewards[keep], negative[keep])
    if positive.any() and unmarked.any():
        keep = positive | unmarked
        out["auroc_positive"] = auroc(rewards[keep], positive[keep])
    if negative.any():
        top = int(negative.sum()) if k is None else k
        out["precision_at_k"] = precision_at_k(-rewards, negative, top)
        out["negative_share"] = float(negative.mean())
    return out


class _Pairs:
    """Per-pair arrays and per-response figures, so a bootstrap resample is a concatenation of
    picked pairs."""

    def __init__(self, rows: Sequence[Mapping[str, Any]], second, k: int | None) -> None:
        self.means = np.array(
            [[_rewards(r, s).mean() if len(_rewards(r, s)) else 0.0 for s in SIDES] for r in rows]
        )
        self.tokens = [np.concatenate([_rewards(r, s) for s in SIDES]) for r in rows]
        # per figure, per pair: the values of its responses the figure is defined for
        self.per_response = {name: [[] for _ in rows] for name in RESPONSE_FIGURES}
        for i, row in enumerate(rows):
            for side in SIDES:
                marks = _marks(row, side)
                if marks is None or not np.isfinite(marks).any():
                    continue
                for name, value in response_figures(_rewards(row, side), marks, k).items():
                    self.per_response[name][i].append(value)
        self.second = (
            None
            if second is None
            else [np.concatenate([_rewards(r, s) for s in SIDES]) for r in second]
        )

    def metrics(self, picks: np.ndarray, near_zero_below: float) -> dict[str, float]:
        means = self.means[picks]
        out = {
            "pair_agreement": float(
                np.mean((means[:, 0] > means[:, 1]) + 0.5 * (means[:, 0] == means[:, 1]))
            ),
            "near_zero": float(np.mean(np.abs(self._cat(self.tokens, picks)) < near_zero_below)),
        }
        for name, per_pair in self.per_response.items():
            values = [value for p in picks for value in per_pair[p]]
            if values:
                out[name] = float(np.mean(values))
        if self.second is not None:
            out["spearman"] = spearman(self._cat(self.tokens, picks), self._cat(self.second, picks))
        return out

    def support(self, name: str) -> tuple[int, int | None]:
        """``(pairs, responses)`` a figure rests on (responses: None for pair-level figures)."""
        if name not in self.per_response:
            return len(self.means), None
        counts = [len(values) for values in self.per_response[name]]
        return sum(1 for c in counts if c), sum(counts)

    @staticmethod
    def _cat(arrays, picks) -> np.ndarray:
        return np.concatenate([arrays[p] for p in picks]) if len(picks) else np.zeros(0)


def check_settings(names: Mapping[str, str] | None = None, **settings) -> None:
    """Refuse audit settings outside their range, naming the setting (``names`` maps a keyword
    to the name the user wrote, e.g. ``{"disagreeing": "--audit.heatmap_pairs"}``).

    Keywords: ``k`` (None or >= 1), ``near_zero_below`` (>= 0), ``bootstrap``, ``disagreeing``
    (>= 0) and ``bins`` (>= 1).

    Raises:
        ConfigError: the first setting out of range.
    """

    def whole(value, least: int) -> bool:
        return (
            isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= least
        )

    rules = {
        "k": (lambda v: v is None or whole(v, 1),
              "must be >= 1 (tokens per response) or unset (each response's number of "
              "negatively marked tokens)"),
        "near_zero_below": (lambda v: isinstance(v, (int, float)) and v >= 0,
                            "must be >= 0 (|r_hat| under which a reward counts as near zero)"),
        "bootstrap": (lambda v: whole(v, 0), "must be >= 0 (resamples; 0: no intervals)"),
        "disagreeing": (lambda v: whole(v, 0), "must be >= 0 (pairs shown; 0: none)"),
        "bins": (lambda v: whole(v, 1), "must be >= 1 (histogram bins)"),
    }  # fmt: skip
    names = names or {}
    for key, value in settings.items():
        ok, need = rules[key]
        if not ok(value):  # NaN fails every comparison, so it is refused too
            raise ConfigError(f"{names.get(key, key)} {value!r}: {need}.")


@dataclass(frozen=True)
class AuditSettings:
    """The own settings of ``treg audit`` (``--audit.*``): the split and how its token rewards
    are measured. Out-of-range values are refused when the settings are made."""

    data_split: str = "train"
    """The data split to audit ("train", "val" or "test")."""

    precision_k: int | None = None
    """Tokens per response of precision@k (>= 1); None: each response's number of negatively
    marked tokens."""

    near_zero_below: float = 0.01
    """``|r_hat|`` under which a reward counts as near zero (>= 0)."""

    bootstrap: int = 1000
    """Resamples over pairs for the 95% intervals (>= 0; 0: no intervals)."""

    bootstrap_seed: int = 0
    """Seed of the resampling."""

    heatmap_pairs: int = 4
    """Pairs in the heat map of the most disagreeing pairs (>= 0)."""

    def __post_init__(self) -> None:
        flags = {"k": "--audit.precision_k", "near_zero_below": "--audit.near_zero_below",
                 "bootstrap": "--audit.bootstrap",
                 "disagreeing": "--audit.heatmap_pairs"}  # fmt: skip
        ranged = self.figures()
        ranged.pop("seed")  # any integer seeds the resampling
        check_settings(flags, **ranged)

    def figures(self) -> dict[str, Any]:
        """The keywords of :func:`audit_rows` these settings give (``seed`` included)."""
        return {"k": self.precision_k, "near_zero_below": self.near_zero_below,
                "bootstrap": self.bootstrap, "seed": self.bootstrap_seed,
                "disagreeing": self.heatmap_pairs}  # fmt: skip


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
        k: tokens per response of ``precision_at_k``; None: each response's number of
            negatively marked tokens.
        near_zero_below: ``|r_hat|`` below which a reward counts as near zero.
        bins: histogram bins over [-0.5, 0.5].
        disagreeing: how many of the most disagreeing pairs to list.
        bootstrap: resamples over pairs for the 95% intervals (0: no intervals).
        seed: seed of the resampling.

    Returns:
        ``{"pairs", "tokens", "metrics": {name: {"value", "low", "high", "pairs"[,
        "responses"]}}, "k", "histogram": {"edges", "counts"}, "disagreeing": [positions],
        "settings"}``; JSON-serializable. ``low`` / ``high`` are None where the figure rests on
        fewer than two pairs, or without resamples.

    Raises:
        ConfigError: a setting out of range (:func:`check_settings`).
    """
    check_settings(
        k=k, near_zero_below=near_zero_below, bins=bins, disagreeing=disagreeing,
        bootstrap=bootstrap,
    )  # fmt: skip
    if not rows:
        raise ValueError("audit_rows needs at least one pair.")
    if second is not None and len(second) != len(rows):
        raise ValueError(f"second has {len(second)} pairs, rows {len(rows)}.")
    pairs = _Pairs(rows, second, k)
    everything = np.arange(len(rows))
    point = pairs.metrics(everything, near_zero_below)
    samples: dict[str, list[float]] = {name: [] for name in point}
    rng = np.random.default_rng(seed)
    for _ in range(bootstrap):
        picks = rng.integers(0, len(rows), len(rows))
        resampled = pairs.metrics(picks, near_zero_below)
        for name in samples:
            samples[name].append(resampled.get(name, math.nan))
    metrics = {}
    for name, value in point.items():
        support, responses = pairs.support(name)
        drawn = np.asarray(samples[name], np.float64)
        drawn = drawn[np.isfinite(drawn)]
        low = high = math.nan
        if support > 1 and len(drawn):  # one pair has no spread to estimate
            low, high = np.percentile(drawn, [2.5, 97.5])
        metrics[name] = {"value": _num(value), "low": _num(low), "high": _num(high),
                         "pairs": support}  # fmt: skip
        if responses is not None:
            metrics[name]["responses"] = responses
    tokens = pairs._cat(pairs.tokens, everything)
    counts, edges = np.histogram(np.clip(tokens, -0.5, 0.5), bins=bins, range=(-0.5, 0.5))
    gap = pairs.means[:, 1] - pairs.means[:, 0]
    order = np.argsort(-gap, kind="mergesort")[:disagreeing]
    return {
        "pairs": len(rows),
        "tokens": int(len(tokens)),
        "metrics": metrics,
        "k": k,
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
    from treg_lightning.rewards.spans import SpanRewards

    if datamodule.rewards is None:
        raise ConfigError(
            "treg audit needs token rewards: data.rewards is null. Set it to a source (e.g. "
            "treg_lightning.rewards.ContrastiveRewards or SpanRewards)."
        )
    tokenized = datamodule.tokenized_rows()
    if split not in tokenized:
        raise ConfigError(
            f"treg audit --audit.data_split {split}: the data has no {split} split (it has "
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
    "auroc_negative": "AUROC of -r_hat, negatively marked vs unmarked tokens, per response",
    "auroc_positive": "AUROC of r_hat, positively marked vs unmarked tokens, per response",
    "precision_at_k": "precision at the k most negative tokens, per response",
    "negative_share": "share of negatively marked tokens, per response (chance level of the "
    "precision at k)",
    "pair_agreement": "pairs whose mean r_hat prefers the chosen response",
    "near_zero": "share of tokens with abs(r_hat) below the near-zero threshold",
    "spearman": "Spearman rank correlation with the second source, pooled over all tokens",
}


def check_report_folder(output_dir: str | Path, overwrite: bool = False) -> None:
    """Refuse an ``output_dir`` that is a file, or a folder that already holds an audit report
    unless ``overwrite`` (checked before any work)."""

    folder = Path(output_dir).expanduser()
    if folder.exists() and not folder.is_dir():
        raise OutputFolderError(
            errno.EEXIST,
            f"--output.path {folder} is a file: the audit writes a folder (audit.md, audit.json "
            "and its PNGs). Give a folder path (a new one, or one without a report).",
        )
    for name in REPORT_FILES:
        path = folder / name
        if path.exists() and not overwrite:
            raise OutputFolderError(
                errno.EEXIST,
                f"{path} exists: audit never writes over a report unless asked to. Choose "
                "another --output.path, move the old report away, or pass --output.overwrite "
                "true to replace it.",
            )


def markdown(result: Mapping[str, Any], title: str = "Token-reward audit") -> str:
    """The report as Markdown: the figures with their 95% intervals, then the histogram."""

    def fmt(x) -> str:
        return "n/a" if x is None else f"{x:.3f}"

    settings = result["settings"]
    if settings["bootstrap"]:
        intervals = (
            f"95% intervals: bootstrap over pairs ({settings['bootstrap']} resamples, seed "
            f"{settings['seed']}); n/a where a figure rests on fewer than two pairs."
        )
    else:
        intervals = "no intervals (bootstrap 0)."
    lines = [
        f"# {title}",
        "",
        f"{result['pairs']} pairs, {result['tokens']} response tokens; {intervals} Per-response "
        'figures are means over the responses they are defined for (see "over").',
        "",
        "| figure | value | 95% interval | over |",
        "|---|---|---|---|",
    ]
    for name, m in result["metrics"].items():
        label = LABELS.get(name, name)
        if name == "precision_at_k":
            k = result["k"]
            label += (
                " (k = each response's number of marked tokens)" if k is None else f" (k = {k})"
            )
        if name == "near_zero":
            label += f" ({settings['near_zero_below']})"
        interval = "n/a" if m["low"] is None else f"[{fmt(m['low'])}, {fmt(m['high'])}]"
        over = f"{m['pairs']} pairs"
        if "responses" in m:
            over = f"{m['responses']} responses of {over}"
        lines.append(f"| {label} | {fmt(m['value'])} | {interval} | {over} |")
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
    overwrite: bool = False,
) -> dict[str, Path]:
    """``audit.md``, ``audit.json`` and (matplotlib installed) the histogram and the heat map of
    the most disagreeing pairs (needs ``rows`` with ids and ``tokenizer``). An earlier report in
    ``output_dir`` is refused, or with ``overwrite`` removed as a whole first (a PNG this report
    does not draw must not stay beside it)."""
    output_dir = Path(output_dir)
    check_report_folder(output_dir, overwrite)
    for name in REPORT_FILES:
        (output_dir / name).unlink(missing_ok=True)
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
