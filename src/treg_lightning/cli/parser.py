"""The ``treg`` parser: short errors with "did you mean", help from the docstring under each
field of a verb's settings, and the arguments every verb shares (``model.model`` linked to
``data.tokenizer``, the non-finite guard, the debug flag)."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

from jsonargparse import lazy_instance, set_parsing_settings
from jsonargparse._optionals import get_docstring_parse_options
from lightning.pytorch.cli import LightningArgumentParser

from treg_lightning.cli.exits import DEBUG_FLAG
from treg_lightning.cli.help import (
    did_you_mean,
    group_file_hint,
    old_schema_hint,
    option_keys,
    renamed_path_hint,
    short_usage,
    show_linked_target,
    without_union_dump,
)
from treg_lightning.training.guards import NonFiniteGuard


class TRegArgumentParser(LightningArgumentParser):
    """``LightningArgumentParser`` whose errors are short (the error and the ``--help`` tip, not
    the usage of every option) and suggest the close key for a misspelled one (a typo in a YAML
    key or flag, ``max_lenght``), or the field of a settings group a bare flag meant
    (``--temperature``: ``--sampling.temperature``). A flag is never abbreviated: ``--seed``
    would silently be ``--seed_everything``."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str, *args, **kwargs):
        keys = option_keys(self._all_usages())
        message = group_file_hint(did_you_mean(without_union_dump(str(message)), keys), keys)
        message = renamed_path_hint(old_schema_hint(message))
        return super().error(message, *args, **kwargs)

    def add_method_arguments(self, *args, **kwargs):
        """As jsonargparse's, with the docstring under each field of a settings dataclass (an
        attribute docstring) as the flag's help: a verb's settings are documented there, once
        (only here: read for Lightning's classes too, they cost seconds per command). The
        method's own arguments are not grouped: jsonargparse would name that group after the
        method, the name of the verb's own settings group (``--audit.*`` of ``audit``)."""
        kwargs.setdefault("as_group", False)
        with attribute_docstrings():
            return super().add_method_arguments(*args, **kwargs)

    def print_usage(self, file=None) -> None:
        usage = short_usage(self.format_usage())
        if usage:
            (file or sys.stdout).write(usage)  # where argparse's print_usage writes

    def _all_usages(self) -> str:
        texts = [self.format_usage()]
        action = getattr(self, "_subcommands_action", None)
        for parser in getattr(action, "_name_parser_map", {}).values():
            texts.append(parser.format_usage())
        return "\n".join(texts)


@contextlib.contextmanager
def attribute_docstrings() -> Iterator[None]:
    """jsonargparse reads attribute docstrings inside the block; its setting as it was after."""
    before = get_docstring_parse_options()["attribute_docstrings"]
    set_parsing_settings(docstring_parse_attribute_docstrings=True)
    try:
        yield
    finally:
        set_parsing_settings(docstring_parse_attribute_docstrings=before)


def add_treg_arguments(parser: LightningArgumentParser) -> None:
    """The arguments of every ``treg`` verb beyond Lightning's own."""
    show_linked_target(parser, "model.model", "data.tokenizer")
    parser.add_argument(
        "--guard",
        type=NonFiniteGuard | None,
        default=lazy_instance(NonFiniteGuard),
        help="Stop (or skip the step) on a non-finite loss or gradient, naming the step and "
        "dataset rows, before the optimizer writes NaN into the weights; null disables it. "
        "E.g. --guard.action=skip --guard.max_skips=5.",
    )
    parser.callback_keys.append("guard")  # the instance joins the trainer's callbacks
    parser.add_argument(
        DEBUG_FLAG,
        action="store_true",
        help="Show the traceback of user errors and interrupts too (or set TREG_DEBUG=1).",
    )
