"""What the ``treg`` parser prints: short errors with a guess at the meant key, and help that
lists every ``data.*`` argument.

- A parse error prints the error and the ``--help`` tip, not the 80-line usage of every option.
- A value refused by an ``X | None`` setting gives X's error, not jsonargparse's list of every
  type tried.
- A misspelled key, in YAML (``does not accept option``) or on the command line
  (``unrecognized arguments``), gets "Did you mean ...?" with the closest key; a bare flag of a
  verb's settings group (``--temperature``) gets the group's (``--sampling.temperature``), and a
  value given to the group itself (``--output answers.jsonl``) the list of its flags.
- A setting of the previous config schema (``data.rewards: annotate``, ``data.template``,
  ``token_rewards: self``) gets a one-line hint with its new form (:func:`old_schema_hint`).
- A class path through a module that has moved (``treg_lightning.schedulers.WarmupCosineLR``)
  gets a one-line hint naming today's path (:func:`renamed_path_hint`).
- ``data.tokenizer`` is set from ``model.model`` by a link; jsonargparse then lists it only under
  "Linked arguments". :func:`show_linked_target` puts its help back in its own group.
"""

from __future__ import annotations

import argparse
import difflib
import re
from collections.abc import Iterable

from treg_lightning.models.renames import renamed_paths

# Usage longer than this many lines is left out of error messages (the tip names --help).
MAX_USAGE_LINES = 4


def did_you_mean(message: str, keys: Iterable[str]) -> str:
    """``message`` plus "Did you mean ...?" for the unknown keys it names, when one is close."""
    keys = sorted(set(keys))
    match = re.search(r"does not accept options? '([^']+)'", message)
    if match:
        close = difflib.get_close_matches(match.group(1), keys, n=1, cutoff=0.75)
        return f"{message}. Did you mean '{close[0]}'?" if close else message
    match = re.search(r"unrecognized arguments: (.+)$", message)
    if match:
        guesses = []
        for word in match.group(1).split():
            key = word.split("=", 1)[0].removeprefix("--")
            if word.startswith("--") and key:
                close = _in_a_group(key, keys) or difflib.get_close_matches(key, keys, cutoff=0.75)
                guesses += [f"--{close[0]}"] if close else []
        if guesses:
            return f"{message}. Did you mean {', '.join(repr(g) for g in guesses)}?"
    return message


def group_file_hint(message: str, keys: Iterable[str]) -> str:
    """``message`` plus the fields of a settings group given a value that is not a YAML of the
    group (``--output answers.jsonl``: the file is read as the group's config)."""
    match = re.search(r'Parser key "(\w+)":\s*Unable to load config', message)
    fields = sorted({k for k in keys if match and k.startswith(f"{match.group(1)}.")})
    if not fields:
        return message
    group, listed = match.group(1), ", ".join(f"--{k}" for k in fields)
    return (
        f"{message}\n--{group} alone takes the whole {group} group as a YAML file or string; "
        f"one setting of it is a flag of its own: {listed}."
    )


def _in_a_group(key: str, keys: list[str]) -> list[str]:
    """The verb's own ``GROUP.key`` for a bare ``key`` (``temperature`` ->
    ``sampling.temperature``): a verb's settings are groups, so a flat flag misses its group."""
    sections, key = ("model.", "data.", "trainer.", "guard."), key.replace("-", "_")
    return [k for k in keys if k.endswith(f".{key}") and k.count(".") == 1
            and not k.startswith(sections)]  # fmt: skip


_REWARDS = "treg_lightning.rewards.ContrastiveRewards"
# data.rewards string values of the previous schema -> the new YAML value.
_OLD_REWARDS = {
    "annotate": f"{{class_path: {_REWARDS}}}` (its settings under init_args",
    "none": "null` (no token rewards",
}
# data.* settings of the previous schema that became settings of the reward source.
_MOVED_TO_REWARDS = {
    "evaluator": "evaluator",
    "evaluator_dtype": "evaluator_dtype",
    "template": "template",
    "store_reference_logps": "store_reference_logps",
    "annotate_batch_size": "batch_size",
    "cache_dir": "cache_dir",
}
_OLD_TARGETS = {"self": "SelfGeneratedRewards", "sft": "ChosenSFT", "implicit": "ImplicitRewards"}


def old_schema_hint(message: str) -> str:
    """``message`` plus a line ``hint: ...`` with the new form of a setting it refuses that the
    previous config schema had (string choices became class paths; the annotation settings
    moved from ``data`` into ``data.rewards``); other messages, and one already hinted (a
    subcommand's error reaches the parser twice), are returned as they are."""
    if "hint: `" in message:
        return message
    match = re.search(r'key "(?:[\w.]*\.)?data\.rewards": Expected a dot import path string: (\S+)',
                      message)  # fmt: skip
    if match and match.group(1) in _OLD_REWARDS:
        value = match.group(1)
        new = _OLD_REWARDS[value]
        return (
            f"{message}\nhint: `data.rewards: {value}` is the previous config schema; write "
            f"`data.rewards: {new})."
        )
    match = re.search(r"does not accept option '((?:[\w.]*\.)?data)\.(\w+)'", message)
    if match and match.group(2) in _MOVED_TO_REWARDS:
        old, new = match.group(2), _MOVED_TO_REWARDS[match.group(2)]
        return (
            f"{message}\nhint: `data.{old}` is the previous config schema; it is now a setting "
            f"of the reward source: `data.rewards: {{class_path: {_REWARDS}, init_args: "
            f"{{{new}: ...}}}}`."
        )
    if re.search(r"Option 'token_rewards' is not accepted", message):
        targets = ", ".join(f"{old} -> {new}" for old, new in _OLD_TARGETS.items())
        return (
            f"{message}\nhint: `token_rewards` is the previous config schema; write "
            "`targets: {class_path: treg_lightning.losses.SelfGeneratedRewards}` in the "
            f"regularizer's init_args ({targets})."
        )
    return message


def renamed_path_hint(message: str) -> str:
    """``message`` plus a line ``hint: ...`` naming today's path of each older module path it
    names (:data:`treg_lightning.models.renames.MOVED_MODULES`); other messages, and one already
    hinted, are returned as they are."""
    renamed = renamed_paths(message)
    if not renamed or "hint: `" in message:
        return message
    moves = "; ".join(f"`{old}` is now `{new}`" for old, new in renamed)
    return f"{message}\nhint: a module path of an earlier version: {moves}; write the new one."


def without_union_dump(message: str) -> str:
    """jsonargparse's "Does not validate against any of the Union subtypes" message (the types
    tried, each one's error, the value's repr) cut to the one error that matters: for an
    ``X | None`` setting, X's. Other messages are returned as they are."""
    lines = message.splitlines()
    try:
        start = lines.index("  Errors:") + 1
    except ValueError:
        return message
    if "Does not validate against any of the Union subtypes" not in message:
        return message
    items: list[list[str]] = []
    for line in lines[start:]:
        if line.startswith("    - "):
            items.append([line[len("    - ") :]])
        elif line.startswith("      ") and items:
            items[-1].append(line[len("    ") :])
        else:
            break
    kept = [item for item in items if item != ["Expected a <class 'NoneType'>"]]
    if len(kept) != 1:
        return message
    return "\n".join([f"{lines[0]} {kept[0][0]}", *kept[0][1:]])


def option_keys(usage: str) -> list[str]:
    """The ``a.b.c`` keys of every ``--a.b.c`` option in a usage text."""
    return re.findall(r"--([\w.]+)", usage)


def short_usage(usage: str) -> str:
    """The usage text if short (the root command's subcommand list), else nothing."""
    return usage if usage.count("\n") < MAX_USAGE_LINES else ""


class _LinkedTargetHelp(argparse.Action):
    """Help-only entry for a link target (never parsed: it is in no parser's action list)."""

    def __init__(self, target: argparse.Action, source: str) -> None:
        text = (target.help or "").rstrip()
        super().__init__(
            option_strings=list(target.option_strings),
            dest=target.dest,
            default=argparse.SUPPRESS,
            metavar=target.dest.rsplit(".", 1)[-1].upper(),
            help=f"{text} Set from --{source}: change that one (type: str).",
        )

    def __call__(self, parser, namespace, values, option_string=None):  # pragma: no cover
        raise AssertionError("help-only entry")


def show_linked_target(parser, source: str, target: str) -> None:
    """``parser.link_arguments(source, target)``, keeping ``target`` listed in its group."""
    action = next(a for a in parser._actions if a.dest == target)
    group = next(g for g in parser._action_groups if action in g._group_actions)
    position = group._group_actions.index(action)
    parser.link_arguments(source, target)
    group._group_actions.insert(position, _LinkedTargetHelp(action, source))
