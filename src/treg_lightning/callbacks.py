"""Callbacks that write a run's user-facing outputs after ``fit``."""

from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import Callback


class ExportOnFitEnd(Callback):
    """After ``fit``: export the policy as a Hugging Face folder, write the token-reward heat
    map of the first training pairs (HTML, and with matplotlib a PNG beside it, also logged as
    an image to TensorBoard / W&B loggers), and print where each output lies.

    Args:
        export_dir: folder for ``save_pretrained`` (safetensors + tokenizer); None skips it.
        heatmap_path: ``.html`` file for the heat map (the PNG takes its name with ``.png``);
            None skips both.
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
                self._heatmap_image(trainer, rows, tokenizer, Path(path).with_suffix(".png"))
        log_dir = trainer.log_dir  # a collective under multi-process strategies: every rank
        if trainer.is_global_zero:
            self._print(trainer, log_dir)

    def _tokenizer(self, trainer: L.Trainer, pl_module: L.LightningModule):
        tokenizer = getattr(trainer.datamodule, "tokenizer", None)
        if tokenizer is None:
            from treg_lightning.models import load_tokenizer

            tokenizer = load_tokenizer(pl_module.model_name)
        return tokenizer

    def _cache_rows(self, trainer: L.Trainer):
        from treg_lightning.rewards.render import has_token_rewards

        datasets = getattr(trainer.datamodule, "datasets", None) or {}
        rows = datasets.get("train")
        if rows is None or not has_token_rewards(getattr(rows, "column_names", ())):
            return None  # no token-reward cache (rewards="none"): nothing to draw
        return rows

    def _heatmap_image(self, trainer: L.Trainer, rows, tokenizer, path: Path) -> None:
        """The PNG of the heat map, also logged to TensorBoard / W&B loggers (needs matplotlib,
        the `plots` extra; skipped without it)."""
        try:
            from treg_lightning.rewards.render_png import log_heatmap_image, render_heatmap_png
        except ImportError:
            return
        png, image = render_heatmap_png(rows, tokenizer, path, n=min(self.heatmap_pairs, 4))
        self.written["token-reward heat map (PNG)"] = png
        log_heatmap_image(trainer.loggers, image, trainer.global_step)

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
