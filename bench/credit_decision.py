"""The decision rule of the credit benchmark (``bench/credit.py``), written down in
bench/README.md before the run it judges; this applies it to the paired differences.

Each argument is a paired difference of the credit share on the held-out non-minimal pairs
(``{"mean", "low", "high"}``, 95% bootstrap interval over seeds and pairs):

- ``oracle``: DPO + T-REG (oracle spans, alpha 1) minus DPO;
- ``oracle_vs_uniform``: the oracle minus the uniform control (alpha 1);
- ``shuffled``: the shuffled-span control (alpha 1) minus DPO.

Verdicts:

- ``supported``: ``oracle`` is at least +0.05 with its interval above 0, and
  ``oracle_vs_uniform``'s interval lies above 0 (the oracle beats the uniform control);
- ``inconclusive`` (raise the budget): not supported, and ``shuffled``'s interval contains 0
  (the shuffled control does not move the credit share either, so the metric has not shown it
  can see misplaced credit at this budget);
- ``refuted``: the shuffled control moves the credit share (its interval excludes 0) and
  ``oracle``'s interval lies within [-0.02, 0.02] or below (its upper end at most +0.02);
- ``undecided``: none of these (an effect between the two thresholds, or one the uniform
  control matches).
"""

from __future__ import annotations

MIN_EFFECT = 0.05
NULL_BAND = 0.02


def moves(interval: dict) -> bool:
    """Whether a paired difference's interval excludes 0."""
    return interval["low"] > 0 or interval["high"] < 0


def decide(oracle: dict, oracle_vs_uniform: dict, shuffled: dict) -> dict:
    """``{"verdict": ..., "why": one sentence}`` under the rule of the module docstring."""

    def fmt(m: dict) -> str:
        return f"{m['mean']:+.3f} [{m['low']:+.3f}, {m['high']:+.3f}]"

    facts = (f"oracle (alpha 1) - DPO {fmt(oracle)}, oracle - uniform {fmt(oracle_vs_uniform)}, "
             f"shuffled - DPO {fmt(shuffled)}")  # fmt: skip
    if oracle["mean"] >= MIN_EFFECT and oracle["low"] > 0 and oracle_vs_uniform["low"] > 0:
        return {"verdict": "supported", "why": facts}
    if not moves(shuffled):
        return {"verdict": "inconclusive", "why": facts}
    if oracle["high"] <= NULL_BAND:
        return {"verdict": "refuted", "why": facts}
    return {"verdict": "undecided", "why": facts}
