"""``treg evaluate``: one table row per run, from held-out pairs and generated answers.

For each run (:class:`EvalRun`):

- held-out pairs (a checkpoint or policy folder given): the validation loop of
  :class:`PreferenceModule` on the data's ``val`` split, under the run's own loss: implicit
  reward accuracy, margin, chosen / rejected rewards, token-reward sign agreement and Pearson
  correlation with ``r_hat`` (when the data carries token rewards), the T-REG term;
- answers (a predictions file of ``treg predict``): length in tokens and words (mean, median,
  95th percentile) and the share that hit ``max_new_tokens``;
- with a reward model: the mean reward of the answers and the win rate against the reference
  policy's answers to the same prompts (a tie counts half), with a 95% normal-approximation
  interval ``p +- 1.96 s / sqrt(n)`` (``s``: the standard deviation of the per-prompt outcomes).

Writes ``evaluation.md`` (a Markdown table) and ``evaluation.json`` into the output folder, plus
``curves.png`` (training curves of the runs with a ``log_dir``) and ``evaluation.png`` (bars) when
matplotlib is installed.
"""

from __future__ import annotations

import copy
import errno
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from treg_lightning.answers.record_files import read_records
from treg_lightning.errors import ConfigError, MissingFileError
from treg_lightning.outputs import OutputFolderError

PAIR_METRICS = (
    "reward_accuracy",
    "margin",
    "chosen_reward",
    "rejected_reward",
    "token_sign_agreement",
    "token_reward_pearson",
    "treg",
    "loss",
)


@dataclass
class EvalRun:
    """One run to evaluate.

    Attributes:
        name: the row's name in the table.
        predictions: its answers (a ``treg predict`` JSONL file).
        ckpt_path: its weights (a ``.ckpt`` file or sharded checkpoint folder), with the loss
            of its own hyperparameters.
        policy: or its policy as a Hugging Face folder (the config's loss is used).
        log_dir: its log folder (CSVLogger ``metrics.csv`` or TensorBoard events) for curves.
    """

    name: str
    predictions: str | None = None
    ckpt_path: str | None = None
    policy: str | None = None
    log_dir: str | None = None


@dataclass(frozen=True)
class EvaluateSettings:
    """The own settings of ``treg evaluate`` (``--evaluate.*``): what the answers are compared
    with and scored by."""

    reference: str | None = None
    """The reference policy's answers (``treg predict`` of the starting model), for the win
    rates; None: no win rates."""

    reward_model: str | None = None
    """A sequence-classification reward model (hub id or folder) scoring (prompt, answer) with
    its chat template; None: no reward columns."""

    reward_batch_size: int = 8
    """Conversations per reward-model forward."""

    reward_dtype: str = "float32"
    """Dtype of the reward model (a torch dtype name, e.g. "float32" or "bfloat16")."""

    answer_max_new_tokens: int | None = None
    """The ``--sampling.max_new_tokens`` the answers were generated with, for answers files
    without ``finish_reason`` (the share that hit it); None: unknown."""

    def __post_init__(self) -> None:
        if self.reward_batch_size < 1:
            raise ConfigError(
                f"--evaluate.reward_batch_size {self.reward_batch_size}: give a number of "
                "conversations >= 1."
            )
        if self.answer_max_new_tokens is not None and self.answer_max_new_tokens < 1:
            raise ConfigError(
                f"--evaluate.answer_max_new_tokens {self.answer_max_new_tokens}: give the "
                "predict run's --sampling.max_new_tokens (>= 1), or leave it unset."
            )


# --- answers ---------------------------------------------------------------------------------


def length_stats(values: list[float]) -> dict[str, float]:
    """Mean, median and 95th percentile (linear interpolation, numpy's default)."""
    array = np.asarray(values, dtype=np.float64)
    return {
        "mean": float(array.mean()),
        "median": float(np.median(array)),
        "p95": float(np.percentile(array, 95)),
    }


def answer_stats(rows: list[dict], tokenizer=None, max_new_tokens: int | None = None) -> dict:
    """Length statistics of answers; tokens from ``output_tokens`` (written by predict) or by
    tokenizing the text."""
    if "output_tokens" in rows[0]:
        tokens = [row["output_tokens"] for row in rows]
    elif tokenizer is not None:
        tokens = [
            len(tokenizer(row["output"], add_special_tokens=False)["input_ids"]) for row in rows
        ]
    else:
        tokens = None
    words = [len(row["output"].split()) for row in rows]
    if "finish_reason" in rows[0]:
        hit = float(np.mean([row["finish_reason"] == "length" for row in rows]))
    elif max_new_tokens is not None and tokens is not None:
        hit = float(np.mean([t >= max_new_tokens for t in tokens]))
    else:
        hit = None
    return {
        "answers": len(rows),
        "tokens": length_stats(tokens) if tokens is not None else None,
        "words": length_stats(words),
        "hit_max_new_tokens": hit,
    }


def prompt_key(row: dict) -> str:
    """What identifies a prompt across predictions files: its messages (or instruction)."""
    messages = row.get("messages")
    prompt = messages[:-1] if messages else row["instruction"]
    return json.dumps(prompt, sort_keys=True, ensure_ascii=False)


def conversation(row: dict) -> list[dict]:
    """Prompt messages + the answer (rows without ``messages``: the instruction as one turn)."""
    answer = {"role": "assistant", "content": row["output"]}
    if row.get("messages"):  # predict writes the prompt messages + the answer
        return [*row["messages"][:-1], answer]
    return [{"role": "user", "content": row["instruction"]}, answer]


def win_rate(rewards: list[float], reference_rewards: list[float]) -> dict[str, float]:
    """Share of prompts where the run's answer out-scores the reference's (ties count half),
    with a 95% normal-approximation interval."""
    outcomes = np.array(
        [1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(rewards, reference_rewards,
                                                                   strict=True)]
    )  # fmt: skip
    n = len(outcomes)
    p = float(outcomes.mean())
    half = 1.96 * float(outcomes.std(ddof=1)) / math.sqrt(n) if n > 1 else float("nan")
    return {
        "win_rate": p,
        "ci_low": max(0.0, p - half),
        "ci_high": min(1.0, p + half),
        "wins": int((outcomes == 1).sum()),
        "ties": int((outcomes == 0.5).sum()),
        "losses": int((outcomes == 0).sum()),
        "n": n,
    }


def matched(rows: list[dict], reference: list[dict], name: str) -> list[int]:
    """For each row, the position of the reference answer to the same prompt."""
    positions: dict[str, list[int]] = {}
    for i, row in enumerate(reference):
        positions.setdefault(prompt_key(row), []).append(i)
    out = []
    for row in rows:
        found = positions.get(prompt_key(row))
        if not found:
            raise ConfigError(
                f"run {name!r}: the reference answers have no answer to the prompt "
                f"{row['instruction'][:80]!r}. Generate both with the same prompts "
                "(treg predict --prompts.file FILE, or the same data split and limit)."
            )
        out.append(found.pop(0) if len(found) > 1 else found[0])
    return out


# --- held-out pairs --------------------------------------------------------------------------


def run_module(base_module, run: EvalRun, datamodule):
    """The :class:`PreferenceModule` of a run, with its policy weights loaded when they come
    from a checkpoint (its own hyperparameters when the checkpoint has them)."""
    from treg_lightning.models.checkpoints import load_policy_weights, policy_state, read_state

    if run.policy is not None:
        module = copy.deepcopy(base_module)
        module.model_name = run.policy  # the reference stays the config's model
        module.live_reference = None  # load it only when the data caches no reference logps
        return module
    module = _module_from_hparams(base_module, run.ckpt_path)
    module.live_reference = None
    module.build_policy()
    state = policy_state(read_state(run.ckpt_path), str(run.ckpt_path))
    lora = getattr(module, "peft", None) is not None
    load_policy_weights(module.policy, state, lora=lora, source=str(run.ckpt_path))
    known, rewards = module.reward_source(datamodule)
    cached = known and rewards is not None and rewards.provides_reference_logps
    if module.needs_reference and not cached:
        module.build_reference()
    return module


def _module_from_hparams(base_module, ckpt_path: str):
    from lightning.pytorch.cli import instantiate_module

    from treg_lightning.models.checkpoints import read_hparams

    hparams = read_hparams(ckpt_path)
    hparams.pop("_class_path", None)
    if not hparams:
        return copy.deepcopy(base_module)
    return instantiate_module(type(base_module), hparams)


def pair_metrics(trainer, module, datamodule) -> dict[str, float]:
    """The validation metrics of ``module`` on the data's ``val`` split."""
    loggers, trainer.loggers = trainer.loggers, []  # no new log version beside a run's logs
    try:
        results = trainer.validate(module, datamodule=datamodule, verbose=False)
    finally:
        trainer.loggers = loggers
    values = results[0] if results else {}
    return {name: float(values[f"val/{name}"]) for name in PAIR_METRICS if f"val/{name}" in values}


# --- the table -------------------------------------------------------------------------------


def evaluate_runs(trainer, base_module, datamodule, runs: list[EvalRun],
                  settings: EvaluateSettings) -> list[dict[str, Any]]:  # fmt: skip
    """One result dict per run (and one for the reference answers, when given)."""
    if not runs:
        raise ConfigError("evaluate needs at least one run: --runs '[{name: ..., ...}]'.")
    for run in runs:
        if not (run.predictions or run.ckpt_path or run.policy):
            raise ConfigError(f"run {run.name!r} has neither predictions nor ckpt_path/policy.")
        for field in ("predictions", "ckpt_path", "policy"):
            value = getattr(run, field)
            if value is not None and not Path(value).exists():
                raise MissingFileError(f"run {run.name!r}: {field} {value} does not exist.")
    answers = {run.name: read_records(run.predictions) for run in runs if run.predictions}
    reference = read_records(settings.reference) if settings.reference else None
    tokenizer = datamodule.get_tokenizer() if datamodule is not None else None
    if tokenizer is not None:  # before any weights load: the policies read the data's ids
        from treg_lightning.answers.evaluate_checks import check_run_policy

        for run in runs:
            if run.policy is not None:
                check_run_policy(run.policy, f"run {run.name!r}: policy", tokenizer)
    results = []
    for run in runs:
        result: dict[str, Any] = {"run": run.name, **asdict(run)}
        if run.ckpt_path or run.policy:
            module = run_module(base_module, run, datamodule)
            result["pairs"] = pair_metrics(trainer, module, datamodule)
            del module
        if run.name in answers:
            result["answers"] = answer_stats(
                answers[run.name], tokenizer, settings.answer_max_new_tokens
            )
        results.append(result)
    if reference is not None:
        results.append(
            {"run": "reference", "predictions": settings.reference,
             "answers": answer_stats(reference, tokenizer, settings.answer_max_new_tokens)}
        )  # fmt: skip
    if settings.reward_model:
        score_answers(results, answers, reference, settings)
    return results


def score_answers(results, answers, reference, settings: EvaluateSettings) -> None:
    """Mean reward of every run's answers; win rate against the reference answers."""
    from treg_lightning.answers.reward_model import RewardModelScorer

    scorer = RewardModelScorer(
        settings.reward_model, settings.reward_dtype, settings.reward_batch_size
    )
    reference_rewards = scorer.score([conversation(r) for r in reference]) if reference else None
    for result in results:
        rows = reference if result["run"] == "reference" else answers.get(result["run"])
        if rows is None:
            continue
        rewards = (
            reference_rewards
            if result["run"] == "reference"
            else scorer.score([conversation(r) for r in rows])
        )
        result["reward"] = {"model": scorer.name, "mean": float(np.mean(rewards))}
        if reference is not None and result["run"] != "reference":
            at = matched(rows, reference, result["run"])
            result["reward"].update(win_rate(rewards, [reference_rewards[i] for i in at]))
    if scorer.truncated:
        for result in results:
            result.setdefault("notes", []).append(
                f"{scorer.truncated} conversations cut from the left to the reward model's "
                f"{scorer.max_length} tokens"
            )


def _fmt(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def markdown_table(results: list[dict[str, Any]]) -> str:
    """The results as one Markdown table, one row per run."""
    header = [
        "run", "reward acc.", "margin", "token sign agr.", "token pearson", "answers",
        "tokens mean / med / p95", "words mean / med / p95", "hit max", "mean reward",
        "win rate [95% CI]",
    ]  # fmt: skip
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in results:
        pairs, answers, reward = r.get("pairs", {}), r.get("answers") or {}, r.get("reward") or {}
        length = {
            k: " / ".join(_fmt(answers[k][s], 1) for s in ("mean", "median", "p95"))
            if answers.get(k) else "-"
            for k in ("tokens", "words")
        }  # fmt: skip
        win = "-"
        if "win_rate" in reward:
            win = f"{reward['win_rate']:.3f} [{reward['ci_low']:.3f}, {reward['ci_high']:.3f}]"
        cells = [
            r["run"], _fmt(pairs.get("reward_accuracy")), _fmt(pairs.get("margin")),
            _fmt(pairs.get("token_sign_agreement")), _fmt(pairs.get("token_reward_pearson")),
            _fmt(answers.get("answers")), length["tokens"], length["words"],
            _fmt(answers.get("hit_max_new_tokens")), _fmt(reward.get("mean")), win,
        ]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_report(results: list[dict[str, Any]], runs: list[EvalRun], output_dir: str | Path,
                 overwrite: bool = False) -> dict[str, Path]:  # fmt: skip
    """``evaluation.md``, ``evaluation.json`` and, with matplotlib, the PNG plots."""
    folder = Path(output_dir)
    check_report_folder(folder, overwrite, runs)
    paths = {"markdown": folder / "evaluation.md", "json": folder / "evaluation.json"}
    folder.mkdir(parents=True, exist_ok=True)
    paths["markdown"].write_text(markdown_table(results), encoding="utf-8")
    paths["json"].write_text(json.dumps(results, indent=1), encoding="utf-8")
    try:
        from treg_lightning.answers import plots
    except ImportError:  # matplotlib is the `plots` extra
        return paths
    paths["bars"] = plots.plot_evaluation(results, folder / "evaluation.png")
    logs = {run.name: run.log_dir for run in runs if run.log_dir}
    if logs:
        paths["curves"] = plots.plot_curves(
            {name: plots.read_metrics(log) for name, log in logs.items()}, folder / "curves.png"
        )
    return paths


def check_report_folder(
    output_dir: str | Path, overwrite: bool, runs: list[EvalRun] | None = None
) -> None:
    """Refuse to write over an earlier report, or a file of that name (the plots included),
    unless asked to (checked before any work). ``curves.png`` counts where a run has a
    ``log_dir`` (``runs`` None: always)."""
    names = ["evaluation.md", "evaluation.json", "evaluation.png"]
    if runs is None or any(run.log_dir for run in runs):
        names.append("curves.png")
    for name in names:
        path = Path(output_dir) / name
        if path.exists() and not overwrite:
            raise OutputFolderError(
                errno.EEXIST,
                f"{path} exists: evaluate never writes over a report or a file of that name. "
                "Choose another --output.path or pass --output.overwrite true.",
            )
