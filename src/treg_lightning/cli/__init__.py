"""The ``treg`` command (:func:`cli_main`): parser and help, start-up checks, exits, noise."""

from treg_lightning.cli.main import TRegCLI, cli_main

__all__ = ["TRegCLI", "cli_main"]
