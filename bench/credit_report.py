"""The credit benchmark's per-token records, the tables computed from them, and the report.

``tokens.json.gz`` holds everything the tables need, so that any metric can be recomputed
without training (``python bench/credit.py --report-from <results folder>``)::

    {"pairs": [{"id", "kind", "seen", "labels": [0/1 per rejected token],
                "rejected_ids": [...], "chosen_tokens": n}, ...],      # end-of-turn left out
     "runs": {variant: [[{"delta": [d_t per rejected token], "chosen_delta": [...],
                          "margin": m, "margin_before": m0}, ...per pair], ...per seed]}}

with ``d_t = log pi - log pi_ref``, rounded to 6 significant digits; the report is computed from
the rounded values, so a recomputation gives the same figures.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np

import credit_decision
import credit_metrics as cm

BASE = "DPO"
ORACLE = "DPO + T-REG (spans, alpha 1)"
UNIFORM = "DPO + T-REG (uniform, alpha 1)"
SHUFFLED = "DPO + T-REG (shuffled spans, alpha 1)"
DENSE = "DPO + T-REG (dense signed, alpha 1)"
CEILING = "DPO (minimal pairs)"
# Direct paired contrasts besides "minus DPO": what each control isolates.
CONTRASTS = ((ORACLE, UNIFORM), (ORACLE, SHUFFLED), (DENSE, ORACLE),
             (ORACLE, "DPO + T-REG (spans, alpha 0.25)"))  # fmt: skip
GROUPS = ("all", "seen", "unseen")


def rounded(values) -> list[float]:
    return [float(f"{v:.6g}") for v in np.asarray(values, np.float64).tolist()]


def save_records(path: Path, pairs: list[dict], runs: dict[str, list[list[dict]]]) -> None:
    """Writes ``tokens.json.gz`` (see the module docstring); ``runs`` values are rounded."""
    out = {"pairs": pairs, "runs": {
        name: [[{"delta": rounded(r["delta"]), "chosen_delta": rounded(r["chosen_delta"]),
                 "margin": rounded([r["margin"]])[0],
                 "margin_before": rounded([r["margin_before"]])[0]} for r in per_pair]
               for per_pair in per_seed]
        for name, per_seed in runs.items()}}  # fmt: skip
    with gzip.open(path, "wt", encoding="utf-8") as f:
        json.dump(out, f, separators=(",", ":"))


def load_records(path: Path) -> dict[str, list[list[dict]]]:
    """``{variant: [[record per pair] per seed]}``, each record the pair's fields and the run's
    (arrays as numpy)."""
    with gzip.open(path, "rt", encoding="utf-8") as f:
        saved = json.load(f)
    pairs = saved["pairs"]
    out = {}
    for name, per_seed in saved["runs"].items():
        out[name] = [[{**pair, **r, "labels": np.asarray(pair["labels"]),
                       "delta": np.asarray(r["delta"]),
                       "chosen_delta": np.asarray(r["chosen_delta"])}
                      for pair, r in zip(pairs, per_pair, strict=True)]
                     for per_pair in per_seed]  # fmt: skip
    return out


def in_group(record: dict, group: str) -> bool:
    return group == "all" or record["seen"] == (group == "seen")


def group_matrix(per_seed: list[list[dict]], metric, group: str) -> np.ndarray:
    keep = [i for i, r in enumerate(per_seed[0]) if in_group(r, group)]
    return cm.matrix([[records[i] for i in keep] for records in per_seed], metric)


def tables(runs: dict[str, list[list[dict]]], draws: int = 2000) -> dict:
    """Levels, paired differences from DPO and the direct contrasts, per group and metric;
    the chance credit share; the decision."""
    out = {"levels": {}, "paired": {}, "contrasts": {}, "chance": {}}
    groups = [g for g in GROUPS if any(in_group(r, g) for r in runs[BASE][0])]
    values = {name: {g: {m: group_matrix(per_seed, f, g) for m, (f, _) in cm.PAIR_METRICS.items()}
                     for g in groups} for name, per_seed in runs.items()}  # fmt: skip
    for name in runs:
        out["levels"][name] = {
            g: {m: cm.paired_bootstrap(v, draws=draws) for m, v in values[name][g].items()}
            for g in groups
        }
        if name != BASE:
            out["paired"][name] = {
                g: {
                    m: cm.paired_bootstrap(v, values[BASE][g][m], draws)
                    for m, v in values[name][g].items()
                }
                for g in groups
            }
    for a, b in CONTRASTS:
        if a in runs and b in runs:
            out["contrasts"][f"{a} - {b}"] = {
                g: {m: cm.paired_bootstrap(values[a][g][m], values[b][g][m], draws)
                    for m in ("credit_share", "auroc", "defect_drop", "rest_change",
                              "chosen_change")} for g in groups}  # fmt: skip
    for g in groups:
        out["chance"][g] = cm.paired_bootstrap(
            group_matrix(runs[BASE], lambda r: cm.chance_share(r["labels"]), g), draws=draws
        )
    out["decision"] = decision(out)
    return out


def decision(table: dict) -> dict | None:
    """The rule of ``credit_decision`` on the credit share (all held-out pairs); None when a
    variant it needs was not run."""
    try:
        oracle = table["paired"][ORACLE]["all"]["credit_share"]
        uniform = table["contrasts"][f"{ORACLE} - {UNIFORM}"]["all"]["credit_share"]
        shuffled = table["paired"][SHUFFLED]["all"]["credit_share"]
    except KeyError:
        return None
    return credit_decision.decide(oracle, uniform, shuffled)


# --- markdown --------------------------------------------------------------------------------

COLUMNS = ("credit_share", "auroc", "first_defect_drop", "defect_drop", "rest_change",
           "chosen_change", "accuracy", "margin")  # fmt: skip
HEADER = ("| variant | credit share | AUROC of -d | first-defect drop | defect drop (nats) | "
          "rest d | chosen d | accuracy | margin |\n"
          "|---|---|---|---|---|---|---|---|---|")  # fmt: skip


def fmt(m: dict, digits: int = 3, sign: bool = False) -> str:
    f = f"{{:{'+' if sign else ''}.{digits}f}}"
    return f"{f.format(m['mean'])} [{f.format(m['low'])}, {f.format(m['high'])}]"


def _rows(by_variant: dict, group: str, sign: bool, names) -> list[str]:
    return [f"| {name} | " + " | ".join(fmt(by_variant[name][group][c], sign=sign)
                                         for c in COLUMNS) + " |" for name in names]  # fmt: skip


def markdown(table: dict, header: str, audits: dict, training: dict) -> str:
    main = [n for n in table["levels"] if n != CEILING]
    groups = list(table["chance"])
    lines = ["# Credit benchmark: results", "", header, ""]
    d = table["decision"]
    if d is not None:
        lines += ["## Decision (the rule in bench/README.md, fixed before the run)", "",
                  f"**{d['verdict']}**: {d['why']}.", ""]  # fmt: skip
    lines += [
        "## Paired differences from DPO (held-out non-minimal pairs, all kinds)",
        "",
        "Same seed, same pairs; mean over seeds and pairs [95% bootstrap interval over "
        "seeds and pairs]. `d` = log pi - log pi_ref; drops are -d (above 0: lowered).",
        "",
        HEADER,
        *_rows(table["paired"], "all", True, [n for n in main if n != "DPO"]),
        "",
    ]
    lines += [
        "## Levels (held-out non-minimal pairs, all kinds)",
        "",
        HEADER,
        *_rows(table["levels"], "all", False, main),
        f"| chance (defect tokens / all) | {fmt(table['chance']['all'])} | 0.5 | | | | | | |",
        "",
    ]
    lines += ["## Seen and unseen kinds: credit share, level and paired difference from DPO", "",
              "| variant | " + " | ".join(f"{g}: level | {g}: minus DPO" for g in groups) + " |",
              "|---|" + "---|---|" * len(groups)]  # fmt: skip
    for name in table["levels"]:
        cells = [f"{fmt(table['levels'][name][g]['credit_share'])} | "
                 + (fmt(table["paired"][name][g]["credit_share"], sign=True)
                    if name in table["paired"] else "-") for g in groups]  # fmt: skip
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append(
        "| chance | " + " | ".join(f"{fmt(table['chance'][g])} | -" for g in groups) + " |"
    )
    lines += ["", "## Direct contrasts (paired, all kinds)", "",
              "| contrast | credit share | AUROC of -d | defect drop | rest d | chosen d |",
              "|---|---|---|---|---|---|"]  # fmt: skip
    for name, by_group in table["contrasts"].items():
        m = by_group["all"]
        lines.append(f"| {name} | " + " | ".join(
            fmt(m[c], sign=True) for c in ("credit_share", "auroc", "defect_drop", "rest_change",
                                          "chosen_change")) + " |")  # fmt: skip
    if CEILING in table["levels"]:
        lines += ["", "## Ceiling control: DPO trained on the minimal twins of the same pairs", "",
                  "Rejected = chosen + defect in every training pair, so DPO's own gradient "
                  "already sits on the defect: what credit share the data alone can teach. "
                  "Scored on the same held-out non-minimal pairs; not part of the decision.", "",
                  HEADER, *_rows(table["levels"], "all", False, [CEILING]),
                  *[r.replace(f"| {CEILING} |", f"| {CEILING} minus DPO |")
                    for r in _rows(table["paired"], "all", True, [CEILING])]]  # fmt: skip
    if audits:
        lines += [
            "",
            "## Token rewards on the held-out pairs (audit: AUROC of -r_hat at the "
            "defect tokens, before training)",
            "",
            "| source | AUROC |",
            "|---|---|",
        ]
        lines += [f"| {key} | {fmt(a)} |" for key, a in audits.items()]
    if training:
        lines += ["", "## Training (mean over seeds, from the logs)", "",
                  "| variant | loss, first step | loss, last step | train margin, last step | "
                  "mean T-REG term |", "|---|---:|---:|---:|---:|"]  # fmt: skip
        lines += [
            f"| {n} | {m['loss_first']:.4f} | {m['loss_last']:.4f} | "
            f"{m['margin_last']:.4f} | {m['treg_mean']:.4f} |"
            for n, m in training.items()
        ]
    return "\n".join(lines) + "\n"
