"""Callbacks that write a run's user-facing outputs after ``fit``."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import Callback

from treg_lightning.data.datamodule import PreferenceDataModule
from treg_lightning.errors import ConfigError
from treg_lightning.outputs import check_not_overwriting


class ExportOnFitEnd(Callback):
    """After ``fit``: export the policy as a Hugging Face folder, write the token-reward heat
    map of the first training pairs (HTML, and with matplotlib a PNG beside it, also logged as
    an image to TensorBoard / W&B loggers), and print where each output lies.

    ``{log_dir}`` in a path stands for the run's own folder (the logger's version folder, e.g.
    ``outputs/demo/logs/version_3``; ``trainer.default_root_dir`` without a logger), so runs
    sharing a root keep each other's outputs. An output that already exists is refused at
    start-up (before any model loads) unless ``overwrite`` is set.

    Args:
        export_dir: folder for ``save_pretrained`` (safetensors + tokenizer); None skips it.
        heatmap_path: ``.html`` file for the heat map (the PNG takes its name with ``.png``);
            None skips both.
        heatmap_pairs: number of pairs shown in the heat map.
        overwrite: write even where an earlier run's outputs are (replacing them).
        adapter_only: with LoRA (``model.peft``), write the adapter alone
            (``PeftModel.from_pretrained(base, folder)`` loads it) instead of the merged model.
    """

    def __init__(
        self,
        export_dir: str | None = "{log_dir}/policy",
        heatmap_path: str | None = "{log_dir}/token_rewards.html",
        heatmap_pairs: int = 8,
        overwrite: bool = False,
        adapter_only: bool = False,
    ) -> None:
        self.adapter_only = adapter_only
        self.export_dir = export_dir
        self.heatmap_path = heatmap_path
        self.heatmap_pairs = heatmap_pairs
        self.overwrite = overwrite
        self.written: dict[str, Path] = {}

    def paths(self, log_dir: str | None) -> dict[str, Path | None]:
        """``{"export_dir": ..., "heatmap_path": ...}`` with ``{log_dir}`` filled in."""
        settings = {"export_dir": self.export_dir, "heatmap_path": self.heatmap_path}
        return {
            name: None if value is None else Path(value.replace("{log_dir}", str(log_dir or ".")))
            for name, value in settings.items()
        }

    def check_outputs(self, trainer: L.Trainer) -> None:
        """Refuse outputs that already exist (an earlier run's), before anything runs."""
        paths = self.paths(trainer.log_dir)
        if paths["heatmap_path"] is not None:  # the PNG beside the page
            paths["heatmap_path (PNG)"] = paths["heatmap_path"].with_suffix(".png")
        for name, path in paths.items():
            allow = "ExportOnFitEnd overwrite: true"
            check_not_overwriting(path, f"ExportOnFitEnd {name}", self.overwrite, allow)
        if paths["export_dir"] is not None:  # a README of the user's the card would replace
            from treg_lightning.models.save import check_replaceable

            check_replaceable(paths["export_dir"], "ExportOnFitEnd export_dir")

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.adapter_only and getattr(pl_module, "peft", None) is None:
            raise ConfigError(
                "ExportOnFitEnd adapter_only: true writes the LoRA adapter alone, but the model "
                "has no adapters (model.peft is not set): drop adapter_only, or set model.peft."
            )

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from treg_lightning.models.export import export_module

        tokenizer = self._tokenizer(trainer, pl_module)
        log_dir = trainer.log_dir  # a collective under multi-process strategies: every rank
        paths = self.paths(log_dir)
        if paths["export_dir"] is not None:
            from treg_lightning.models.save import staged_folder
            from treg_lightning.training.card_metrics import live_metrics
            from treg_lightning.training.model_card import model_card, write_model_card

            export_dir = Path(paths["export_dir"])
            # Rank 0 writes into a temporary sibling swapped in at the end (an earlier export
            # stays intact if this one fails); the other ranks only take part in the gather.
            setting = "ExportOnFitEnd export_dir"
            staging = (
                staged_folder(export_dir, setting=setting)
                if trainer.is_global_zero
                else nullcontext()
            )
            with staging as target:
                folder = export_module(  # collective
                    pl_module, target or export_dir, tokenizer, self.adapter_only
                )
                if folder is not None:
                    source = getattr(trainer.datamodule, "source", None)
                    metrics = live_metrics(trainer)
                    card = model_card(pl_module, source, metrics, self.adapter_only)
                    write_model_card(folder, card)
            if folder is not None:
                what = "LoRA adapter (peft folder)" if self.adapter_only else "Hugging Face folder"
                self.written[f"policy ({what})"] = export_dir
        if trainer.is_global_zero and paths["heatmap_path"] is not None:
            rows = self._cache_rows(trainer)
            if rows is not None:
                from treg_lightning.rewards.render import render_heatmap

                path = render_heatmap(rows, tokenizer, paths["heatmap_path"], n=self.heatmap_pairs)
                self.written["token-reward heat map"] = Path(path)
                self._heatmap_image(trainer, rows, tokenizer, Path(path).with_suffix(".png"))
        if trainer.is_global_zero:
            self._print(trainer, log_dir)

    def _tokenizer(self, trainer: L.Trainer, pl_module: L.LightningModule):
        data = trainer.datamodule
        tokenizer = data.tokenizer if isinstance(data, PreferenceDataModule) else None
        if tokenizer is None:
            from treg_lightning.models.loading import load_tokenizer

            tokenizer = load_tokenizer(pl_module.model_name)
        return tokenizer

    def _cache_rows(self, trainer: L.Trainer):
        from treg_lightning.rewards.render import has_token_rewards

        data = trainer.datamodule
        rows = data.datasets.get("train") if isinstance(data, PreferenceDataModule) else None
        if not rows or not has_token_rewards(k for k, v in rows[0].items() if v is not None):
            return None  # no token rewards (data.rewards: null): nothing to draw
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
