"""The settings groups of the verbs that answer prompts (``treg predict``, ``treg pairs``).

Each group is one dataclass, declared once and taken by every verb that has these knobs; its
fields are the verb's flags, ``--prompts.limit``, ``--generation.batch_size``, and the docstring
under each field is the flag's ``--help`` text. The decoding knobs are
:class:`~treg_lightning.answers.generation.SamplingSettings`, the output
:class:`~treg_lightning.outputs.Output`.
"""

from __future__ import annotations

from dataclasses import dataclass

from treg_lightning.errors import ConfigError


@dataclass(frozen=True)
class PromptSet:
    """The prompts a verb answers (``--prompts.*``)."""

    file: str | None = None
    """A prompts file: .jsonl, .jsonl.gz or a .json list (strings, message lists or objects with
    a prompt, messages or instruction field), or .csv / .parquet (one of those columns); None:
    the data's prompts of ``split``."""

    split: str = "val"
    """The data split whose prompts are answered when no ``file`` is given ("train" or
    "val")."""

    limit: int | None = None
    """Answer only the first ``limit`` prompts (>= 1); None: all of them."""


@dataclass(frozen=True)
class GenerationSettings:
    """How the answers are batched, sharded over ranks and labelled (``--generation.*``)."""

    batch_size: int = 8
    """Prompts per generate call (left-padded)."""

    shard_size: int = 64
    """Prompts per resumable shard file; shard k goes to rank k % world_size."""

    generator: str | None = None
    """The ``generator`` field of every answer; None: the model / checkpoint name."""

    progress: bool = True
    """Show a progress bar (rank 0)."""

    def __post_init__(self) -> None:
        for name in ("batch_size", "shard_size"):
            value = getattr(self, name)
            if value < 1:
                raise ConfigError(f"--generation.{name} {value}: give a number of prompts >= 1.")
