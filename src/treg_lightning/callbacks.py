"""Callbacks that write a run's user-facing outputs after ``fit``."""

from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import Callback

from treg_lightning.data.datamodule import PreferenceDataModule
from treg_lightning.pairs import field


class ExportOnFitEnd(Callback):
    """After ``fit``: export the policy as a Hugging Face folder, write the token-reward heat
    map of the first training pairs, and print where each output lies.

    Args:
        export_dir: folder for ``save_pretrained`` (safetensors + tokenizer); None skips it.
        heatmap_path: ``.html`` file for the heat map; None skips it.
        heatmap_pairs: number of pairs shown in the heat map.
    """

    def __init__(
        self,
        export_dir: str | None = "outputs/policy",
        heatmap_path: str | None = "outputs/token_rewards.html",
        heatmap_pairs: int = 8,
    ) -> None:
        self.export_dir = export_dir
        self.heatmap_path = heatmap_path
        self.heatmap_pairs = heatmap_pairs
        self.written: dict[str, Path] = {}

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from treg_lightning.export import export_module

        tokenizer = self._tokenizer(trainer, pl_module)
        if self.export_dir is not None:
            folder = export_module(pl_module, self.export_dir, tokenizer)  # collective
            if folder is not None:
                self.written["policy (Hugging Face folder)"] = folder
        if trainer.is_global_zero and self.heatmap_path is not None:
            rows = self._cache_rows(trainer)
            if rows is not None:
                from treg_lightning.rewards.render import render_heatmap

                path = render_heatmap(rows, tokenizer, self.heatmap_path, n=self.heatmap_pairs)
                self.written["token-reward heat map"] = Path(path)
        log_dir = trainer.log_dir  # a collective under multi-process strategies: every rank
        if trainer.is_global_zero:
            self._print(trainer, log_dir)

    def _tokenizer(self, trainer: L.Trainer, pl_module: L.LightningModule):
        data = trainer.datamodule
        tokenizer = data.tokenizer if isinstance(data, PreferenceDataModule) else None
        if tokenizer is None:
            from treg_lightning.models import load_tokenizer

            tokenizer = load_tokenizer(pl_module.model_name)
        return tokenizer

    def _cache_rows(self, trainer: L.Trainer):
        data = trainer.datamodule
        rows = data.datasets.get("train") if isinstance(data, PreferenceDataModule) else None
        if not rows or rows[0].get(field("chosen", "token_rewards")) is None:
            return None  # no token rewards (data.rewards: null): nothing to draw
        return rows

    def _print(self, trainer: L.Trainer, log_dir: str | None) -> None:
        checkpoint = getattr(trainer.checkpoint_callback, "best_model_path", "") or getattr(
            trainer.checkpoint_callback, "last_model_path", ""
        )
        if checkpoint:
            self.written["checkpoint"] = Path(checkpoint)
        if log_dir:
            self.written["logs (metrics, config)"] = Path(log_dir)
        width = max(len(name) for name in self.written) if self.written else 0
        lines = [f"  {name:<{width}}  {path.resolve()}" for name, path in self.written.items()]
        print("\nOutputs:\n" + "\n".join(lines), flush=True)
