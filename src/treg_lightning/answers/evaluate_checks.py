"""Start-up checks of ``treg evaluate``'s inputs, before any model loads.

Each run's name (one table row each, so they must differ), its predictions file (JSON lines of
``treg predict``, not a pairs file), its checkpoint (not empty, truncated or foreign) or policy
folder, the reference answers and the reward-model folder: each refused with a message naming
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
    """Refuse a missing, empty or non-JSON-lines answers file, or a pairs file given instead.

    Args:
        path: the file (a ``treg predict`` output: one JSON object per line with ``output``
            and ``messages`` or ``instruction``).
        what: the setting that names it, e.g. ``run 'a': predictions`` (named in errors).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        where = "is a folder" if path.is_dir() else "does not exist"
        raise MissingFileError(
            f"{what} {path} {where}: give the answers file written by treg predict "
            "(--output.path of treg predict, one JSON object per line)."
        )
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as error:
        raise ConfigError(
            f"{what} {path} is not UTF-8 text (byte {error.start}): give the JSON lines file "
            "written by treg predict."
        ) from None
    numbered = [(n, line) for n, line in enumerate(lines, start=1) if line.strip()]
    if not numbered:
        raise ConfigError(
            f"{what} {path} is empty: it holds no answers. Run treg predict again (the run "
            "that wrote it may have been stopped), or give another file."
        )
    for number, line in numbered:
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise ConfigError(
                f"{what} {path} line {number} is not JSON ({error.msg}): an answers file holds "
                "one JSON object per line, as treg predict writes it."
            ) from None
        if not isinstance(row, dict):
            raise ConfigError(
                f"{what} {path} line {number} is a JSON {type(row).__name__}, not an object: an "
                "answers file holds one JSON object per line, as treg predict writes it."
            )
        _check_answer_row(row, number, path, what)


def _check_answer_row(row: dict, number: int, path: Path, what: str) -> None:
    if "output" not in row and {"chosen", "rejected"} <= set(row):
        raise ConfigError(
            f"{what} {path} is a file of preference pairs (line {number} has 'chosen' and "
            "'rejected', no 'output'), not answers. Generate the run's answers with treg "
            "predict and give that file; the pairs go to --data.source."
        )
    if "output" not in row or not ("messages" in row or "instruction" in row):
        raise ConfigError(
            f"{what} {path} line {number} has keys {sorted(row)}; an answer needs 'output' and "
            "'messages' or 'instruction' (as treg predict writes them)."
        )


def _looks_local(name: str) -> bool:
    return name.startswith(("/", ".", "~")) or Path(name).expanduser().exists()


def check_model_folder(name: str, what: str, kind: str) -> None:
    """Refuse a local model folder that does not exist or holds no ``config.json`` (a Hub id
    passes: it is read when the model loads)."""
    if not _looks_local(str(name)):
        return
    path = Path(name).expanduser()
    if not path.is_dir():
        raise MissingFileError(
            f"{what} {path} does not exist (or is not a folder): give the folder of a {kind} "
            "written by save_pretrained, or a Hugging Face hub id."
        )
    if not (path / "config.json").is_file():
        raise MissingFileError(
            f"{what} {path} holds no config.json: it is not a model folder. Give the folder of "
            f"a {kind} written by save_pretrained, or a Hugging Face hub id."
        )


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
            check_model_folder(run.policy, f"{label} policy", "causal language model")
    if reference is not None:
        check_answers_file(reference, "--evaluate.reference")
    if reward_model is not None:
        what = "sequence-classification reward model"
        check_model_folder(reward_model, "--evaluate.reward_model", what)
