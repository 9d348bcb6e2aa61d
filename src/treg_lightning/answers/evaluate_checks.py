"""Start-up checks of ``treg evaluate``'s inputs, before any model loads.

Each run's name (one table row each, so they must differ), its predictions file (JSON lines of
``treg predict``, not a pairs file), its checkpoint (not empty, truncated or foreign) or policy
(a causal LM), the reference answers and the reward model (a sequence classifier with one
output, or an output field named): each refused with a message naming
the run, the file and what to do.
"""

from __future__ import annotations

import json
from pathlib import Path

from treg_lightning.errors import ConfigError, MissingFileError

REFERENCE_ROW = "reference"  # the name of the reference answers' row in the table


def check_run_names(names: list[str], has_reference: bool) -> None:
    """Refuse two runs of one name (the second's answers would fill both rows) and, with
    reference answers, a run named like their row."""
    seen: dict[str, int] = {}
    for number, name in enumerate(names, start=1):
        if name in seen:
            raise ConfigError(
                f"--runs: runs {seen[name]} and {number} are both named {name!r}; each run is "
                "one row of the table, found by its name, so the second would replace the "
                "first's answers. Give every run its own name."
            )
        seen[name] = number
    if has_reference and REFERENCE_ROW in seen:
        raise ConfigError(
            f"--runs: run {seen[REFERENCE_ROW]} is named {REFERENCE_ROW!r}, the name of the row "
            "of the --evaluate.reference answers. Give the run another name."
        )


def check_answers_file(path: str | Path, what: str) -> None:
    """Refuse a missing, empty or unreadable answers file, or a pairs file given instead.

    Args:
        path: the file (a ``treg predict`` output: JSON lines, or one JSON list when named
            ``.json``, of objects with ``output`` and ``messages`` or ``instruction``).
        what: the setting that names it, e.g. ``run 'a': predictions`` (named in errors).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        where = "is a folder" if path.is_dir() else "does not exist"
        raise MissingFileError(
            f"{what} {path} {where}: give the answers file written by treg predict "
            "(--output.path of treg predict: .jsonl, one JSON object per line, or a .json list)."
        )
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ConfigError(
            f"{what} {path} is not UTF-8 text (byte {error.start}): give the answers file "
            "written by treg predict."
        ) from None
    rows = _json_list(text, path, what) if path.suffix == ".json" else _json_lines(text, path, what)
    if not rows:
        raise ConfigError(
            f"{what} {path} is empty: it holds no answers. Run treg predict again (the run "
            "that wrote it may have been stopped), or give another file."
        )
    for where, row in rows:
        if not isinstance(row, dict):
            raise ConfigError(
                f"{what} {path} {where} is a JSON {type(row).__name__}, not an object: an "
                "answers file holds one JSON object per answer, as treg predict writes it."
            )
        _check_answer_row(row, where, path, what)


def _json_lines(text: str, path: Path, what: str) -> list[tuple[str, object]]:
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append((f"line {number}", json.loads(line)))
        except json.JSONDecodeError as error:
            raise ConfigError(
                f"{what} {path} line {number} is not JSON ({error.msg}): an answers file holds "
                "one JSON object per line, as treg predict writes it (or one JSON list, named "
                ".json)."
            ) from None
    return rows


def _json_list(text: str, path: Path, what: str) -> list[tuple[str, object]]:
    if not text.strip():
        return []
    try:
        values = json.loads(text)
    except json.JSONDecodeError as error:
        raise ConfigError(
            f"{what} {path} is not JSON ({error.msg}, line {error.lineno}): a .json answers "
            "file holds one JSON list of answers, as treg predict writes it."
        ) from None
    if not isinstance(values, list):
        raise ConfigError(
            f"{what} {path} holds a JSON {type(values).__name__}, not a list: a .json answers "
            "file holds one JSON list of answers, as treg predict writes it."
        )
    return [(f"item {i}", value) for i, value in enumerate(values)]


def _check_answer_row(row: dict, where: str, path: Path, what: str) -> None:
    if "output" not in row and {"chosen", "rejected"} <= set(row):
        raise ConfigError(
            f"{what} {path} is a file of preference pairs ({where} has 'chosen' and "
            "'rejected', no 'output'), not answers. Generate the run's answers with treg "
            "predict and give that file; the pairs go to --data.source."
        )
    if "output" not in row or not ("messages" in row or "instruction" in row):
        raise ConfigError(
            f"{what} {path} {where} has keys {sorted(row)}; an answer needs 'output' and "
            "'messages' or 'instruction' (as treg predict writes them)."
        )


def check_run_policy(name: str, what: str, tokenizer=None) -> None:
    """A run's policy exists and is a causal LM (a reward model or an adapter folder is named as
    such); with ``tokenizer`` (the data tokenizer, which writes the held-out pairs it scores),
    it reads that tokenizer's ids. Reads config and tokenizer files only."""
    from treg_lightning.models.preflight import check_model

    check_model(name, what, tokenizer=tokenizer, fed="the data tokenizer (data.tokenizer)")


def check_evaluate_inputs(runs, reference: str | None, reward_model: str | None) -> None:
    """Every input of ``treg evaluate`` (see the module docstring), before any model loads."""
    from treg_lightning.models.checkpoints import check_checkpoint_file, is_file_path

    check_run_names([run.name for run in runs], reference is not None)
    for run in runs:
        label = f"run {run.name!r}:"
        if run.predictions is not None:
            check_answers_file(run.predictions, f"{label} predictions")
        if run.ckpt_path is not None and is_file_path(run.ckpt_path):
            check_checkpoint_file(run.ckpt_path, f"{label} ckpt_path")
        if run.policy is not None:
            check_run_policy(run.policy, f"{label} policy")
    if reference is not None:
        check_answers_file(reference, "--evaluate.reference")
    if reward_model is not None:
        from treg_lightning.answers.reward_model import check_reward_model

        check_reward_model(reward_model, "--evaluate.reward_model")
