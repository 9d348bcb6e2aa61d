"""``PreferenceModule``: DPO / IPO / SimPO (any :class:`PreferenceLoss`) with the T-REG regularizer.

The loss, the regularizer, the optimizer and the scheduler are injected (``class_path`` in
YAML); the models are built in an idempotent ``configure_model()``, sharded with FSDP2 when the
strategy is ``ModelParallelStrategy``. One training step:

1. ``forward_logps``: chosen and rejected go through the policy in ONE forward
   (:mod:`treg_lightning.forward.batch`); per-token log-probs come from the final hidden states in
   chunks, never as full float32 logits;
2. ``reference_logps``: for losses that use a reference, the reference token log-probs cached in
   the batch, or a frozen reference model's forward;
3. ``compute_loss``: the :class:`~treg_lightning.pairs.PairScores` of the batch go to the loss
   and the regularizer; ``mean(loss.losses + regularizer.losses)``;
4. ``log_metrics``: ``train/*``, ``val/*`` and ``test/*`` via :mod:`treg_lightning.metrics`.

Each step is a small method, so a subclass overrides exactly the piece it changes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from jsonargparse import lazy_instance
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from torch import nn

from treg_lightning.data.datamodule import PreferenceDataModule
from treg_lightning.data.resumable import reopen_cut_epoch
from treg_lightning.errors import ConfigError
from treg_lightning.forward.batch import (
    bind_token_logps,
    packed_token_logps,
    padded_token_logps,
    shared_prompt_token_logps,
    uses_flash_attention,
    uses_shared_prompt,
)
from treg_lightning.forward.logprobs import model_softcap
from treg_lightning.losses import SimPOLoss, TokenRewardRegularizer
from treg_lightning.losses.base import LossOutput, PreferenceLossModule
from treg_lightning.losses.treg import RegularizerOutput
from treg_lightning.metrics import PreferenceMetrics
from treg_lightning.models import loading
from treg_lightning.models.adapters import (
    LoraConfig,
    QLoRA,
    check_adapter_settings,
    keep_adapters_only,
)
from treg_lightning.models.checkpoints import load_checkpoint
from treg_lightning.models.loading import (
    check_attn_dtype,
    check_attn_implementation,
    parse_dtype,
)
from treg_lightning.models.lora import adapters_disabled, apply_lora
from treg_lightning.models.parallel import prepare_for_training, set_gradient_sync
from treg_lightning.models.renames import upgrade_hparams
from treg_lightning.module.checks import check_module_settings, check_pair_inputs
from treg_lightning.module.hparams import portable_hparams, real_class
from treg_lightning.module.schedulers import WarmupCosineLR, estimated_training_steps
from treg_lightning.module.seeding import seed_step
from treg_lightning.module.vocab import check_batch_fits, check_model_fits_data
from treg_lightning.pairs import SIDES, PairScores, field
from treg_lightning.rewards.source import TokenRewardSource


class PreferenceModule(L.LightningModule):
    """Preference optimization of a Hugging Face causal LM, with optional T-REG.

    Args:
        model: the policy to train: hub id, local ``save_pretrained`` folder, ``.gguf`` file or
            ``"smollm2"``.
        loss: the sequence-level loss (``treg_lightning.losses.SimPOLoss``, ``DPOLoss``,
            ``IPOLoss`` or any nn.Module following ``PreferenceLoss``).
        regularizer: the T-REG regularizer; null (or ``alpha: 0``) trains with the plain loss.
        optimizer: builds the optimizer from the policy parameters; None = AdamW(lr=1e-6,
            weight_decay=0).
        scheduler: builds the per-step learning-rate scheduler from the optimizer; default
            :class:`WarmupCosineLR` (warmup ratio 0.1, cosine decay; total steps from the
            trainer); None = constant learning rate.
        reference_model: the frozen reference; None = the same weights as ``model`` (with
            ``peft``: the policy itself with its adapters disabled, no second copy).
        live_reference: whether to load the reference model. None (auto) loads it only when the
            loss needs a reference and the data's reward source serves no cached reference
            log-probs; False never loads it (start-up fails if the loss needs one and none is
            cached).
        torch_dtype: dtype the models are loaded in (``"float32"``, ``"bfloat16"``).
        attn_implementation: attention kernel (``"eager"``, ``"sdpa"``, ``"flash_attention_2"``);
            None picks one for the device and model.
        gradient_checkpointing: recompute each decoder layer in the backward pass.
        logp_chunk_size: tokens per chunk of ``[chunk, vocab]`` logits in the log-prob pass.
        softcap: final-logit soft-capping; None = the model config's
            ``final_logit_softcapping`` (Gemma-2: 30.0) or none.
        packing: run chosen and rejected as one padding-free packed row instead of a padded
            batch; None (auto) packs when the model uses flash-attention (varlen kernels), where
            it saves the padding compute. With sdpa/eager it builds an ``[N, N]`` mask (tests).
        shared_prompt: compute each pair's prompt once, both responses attending to it in one
            sequence (:mod:`treg_lightning.forward.shared_prompt`); same log-probs, losses and
            gradients. None (auto): on unless the model runs flash-attention (its varlen kernel
            cannot express the mask) or a batch's sides differ in their prompts; measured
            faster on CPU at HH-RLHF lengths, see :mod:`treg_lightning.forward.batch`.
        fsdp_param_dtype: FSDP2 compute dtype of the all-gathered parameters (``"bfloat16"`` on
            GPU); None keeps the stored dtype. Only used under ``ModelParallelStrategy``.
        fsdp_cpu_offload: FSDP2 offloads parameters, gradients and optimizer states to CPU.
        fsdp_sync_every_micro_batch: FSDP2 under gradient accumulation: reduce-scatter the
            gradients after every micro-batch instead of once per optimizer step. The default
            (False) makes one collective per step and holds one unsharded float32 copy of the
            trainable gradients between syncs (``treg plan`` counts it); True trades that memory
            for a reduce-scatter per micro-batch (e.g. a model whose full gradients do not fit).
        compile: ``torch.compile`` each decoder layer of the policy (after sharding). Off by
            default: on the CPU benchmark it gained nothing measurable (bench/README.md).
        compile_options: keyword arguments for ``torch.compile`` (default ``{"dynamic": True}``:
            sequence lengths change from batch to batch).
        trust_remote_code: allow model code from the hub.
        peft: LoRA / DoRA adapters (``class_path: peft.LoraConfig``: ``r``, ``lora_alpha``,
            ``lora_dropout``, ``target_modules``, ``use_dora``); the base weights freeze and
            only the adapters train, are checkpointed and reach the optimizer. None: full
            fine-tuning.
        quantization: load the frozen base in 4 bits under the adapters
            (``class_path: treg_lightning.models.adapters.QLoRA``; CUDA and bitsandbytes only,
            refused elsewhere at start-up). Needs ``peft``.
    """

    def __init__(
        self,
        model: str,
        loss: PreferenceLossModule = lazy_instance(SimPOLoss),
        regularizer: TokenRewardRegularizer | None = lazy_instance(TokenRewardRegularizer),
        optimizer: OptimizerCallable | None = None,
        scheduler: LRSchedulerCallable | None = WarmupCosineLR,
        reference_model: str | None = None,
        live_reference: bool | None = None,
        torch_dtype: str = "float32",
        attn_implementation: str | None = None,
        gradient_checkpointing: bool = False,
        logp_chunk_size: int = 1024,
        softcap: float | None = None,
        packing: bool | None = None,
        shared_prompt: bool | None = None,
        fsdp_param_dtype: str | None = None,
        fsdp_cpu_offload: bool = False,
        fsdp_sync_every_micro_batch: bool = False,
        compile: bool = False,
        compile_options: dict[str, Any] | None = None,
        trust_remote_code: bool = False,
        peft: LoraConfig | None = None,
        quantization: QLoRA | None = None,
    ) -> None:
        super().__init__()
        portable_hparams(self, locals())
        # At start-up, not when configure_model loads the model (after the annotate pass).
        parse_dtype(torch_dtype)
        check_attn_implementation(attn_implementation)
        check_module_settings(logp_chunk_size, packing, attn_implementation)
        check_adapter_settings(peft, quantization)
        self.peft = peft
        self.quantization = quantization
        self.model_name = model
        self.loss = _initialized(loss)
        self.regularizer = _initialized(regularizer)
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.reference_model_name = reference_model or model
        self.live_reference = live_reference
        self.torch_dtype = torch_dtype
        self.attn_implementation = attn_implementation
        self.gradient_checkpointing = gradient_checkpointing
        self.logp_chunk_size = logp_chunk_size
        self.softcap = softcap
        self.packing = packing
        self.shared_prompt = shared_prompt
        self.fsdp_param_dtype = fsdp_param_dtype
        self.fsdp_cpu_offload = fsdp_cpu_offload
        self.fsdp_sync_every_micro_batch = fsdp_sync_every_micro_batch
        self.compile = compile
        self.compile_options = compile_options
        self.trust_remote_code = trust_remote_code
        self.policy: nn.Module | None = None
        self.reference: nn.Module | None = None
        self.train_metrics = PreferenceMetrics()
        self.val_metrics = PreferenceMetrics()
        self.test_metrics = PreferenceMetrics()

    # ---- models ---------------------------------------------------------------------------

    @property
    def needs_reference(self) -> bool:
        """Whether the loss uses reference log-probs (SimPO does not; DPO and IPO do)."""
        return bool(getattr(self.loss, "needs_reference", False))

    def reward_source(self, datamodule=None) -> tuple[bool, TokenRewardSource | None]:
        """``(known, source)``: the token-reward source of the attached
        :class:`PreferenceDataModule` (``datamodule`` defaults to the trainer's); ``known`` is
        False for any other datamodule, whose batches alone tell what they carry."""
        if datamodule is None and self._trainer is not None:
            datamodule = self._trainer.datamodule
        if isinstance(datamodule, PreferenceDataModule):
            return True, datamodule.rewards
        return False, None

    def check_inputs(self, datamodule=None) -> None:
        """Fail at start-up, before any model loads, when the loss or the regularizer needs what
        the data's reward source (or a live reference) cannot provide
        (:func:`treg_lightning.module.checks.check_pair_inputs`). Called by ``prepare_data``,
        ``configure_model`` and the CLI."""
        known, rewards = self.reward_source(datamodule)
        if known:
            check_pair_inputs(self.loss, self.regularizer, self.live_reference, rewards)
        if self._trainer is not None:
            self.check_strategy(self._trainer)

    def check_strategy(self, trainer) -> None:
        """Refuse, before any weights load, what ``trainer``'s device, strategy and precision
        cannot run: QLoRA off CUDA, a flash-attention kernel computing in float32, LoRA under
        FSDP1 (its adapters-only checkpoints need DDP or FSDP2). Called by the CLI on every
        process before launching, and by ``prepare_data`` / ``configure_model``."""
        from lightning.pytorch.strategies import FSDPStrategy

        strategy = trainer.strategy
        if self.quantization is not None:
            self.check_device(strategy.root_device.type)
        check_attn_dtype(self.attn_implementation, self.compute_dtype(trainer))
        if self.peft is not None and isinstance(strategy, FSDPStrategy):
            raise ConfigError(
                "model.peft (LoRA adapters) does not train under FSDPStrategy (FSDP1): its "
                "checkpoints hold the adapters only, which FSDP1's state dicts cannot. Use "
                "configs/strategy/fsdp2.yaml (FSDP2) or configs/strategy/ddp.yaml instead."
            )

    def check_device(self, device_type: str) -> None:
        """Refuse, before any weights load, settings the device cannot run (QLoRA off CUDA)."""
        if self.quantization is not None:
            self.quantization.check(device_type)

    @property
    def adapters_are_reference(self) -> bool:
        """The reference is the policy with its LoRA adapters off (``peft`` set and the
        reference model is the policy's base): nothing more is loaded."""
        return self.peft is not None and self.reference_model_name == self.model_name

    def wants_live_reference(self) -> bool:
        if self.live_reference is not None:
            return self.live_reference
        if not self.needs_reference:
            return False
        known, rewards = self.reward_source()
        return not (known and rewards is not None and rewards.provides_reference_logps)

    def compute_dtype(self, trainer=None) -> torch.dtype:
        """The dtype the models compute in, which decides whether flash-attention can run:
        the autocast dtype of a ``*-mixed`` precision, else the ``param_dtype`` of FSDP1's
        mixed precision (``FSDPStrategy``) or ``fsdp_param_dtype`` (FSDP2), else the dtype a
        ``*-true`` precision converts the weights to, else ``torch_dtype``. ``trainer``
        defaults to the module's own."""
        from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

        trainer = trainer or self._trainer
        if trainer is None:
            return parse_dtype(self.torch_dtype)
        precision = str(trainer.precision)
        half = torch.bfloat16 if precision.startswith("bf16") else torch.float16
        if precision.endswith("-mixed"):
            return half
        strategy = trainer.strategy
        if isinstance(strategy, FSDPStrategy):
            config = strategy.mixed_precision_config
            if config is not None and config.param_dtype is not None:
                return config.param_dtype
        if isinstance(strategy, ModelParallelStrategy) and self.fsdp_param_dtype:
            return parse_dtype(self.fsdp_param_dtype)
        if precision.endswith("-true") and precision.startswith(("bf16", "16")):
            return half
        return parse_dtype(self.torch_dtype)

    def load_model(self, name_or_path: str) -> nn.Module:
        """Load one causal LM (override to build models differently, e.g. with LoRA)."""
        device = self._trainer.strategy.root_device.type if self._trainer is not None else None
        if self.quantization is not None:
            return self.quantization.load(
                name_or_path,
                torch_dtype=self.torch_dtype,
                attn_implementation=self.attn_implementation,
                trust_remote_code=self.trust_remote_code,
                device_type=device,
            )
        # Through the module: a test (or a user) that replaces loading.load_causal_lm is obeyed.
        return loading.load_causal_lm(
            name_or_path,
            torch_dtype=self.torch_dtype,
            attn_implementation=self.attn_implementation,
            trust_remote_code=self.trust_remote_code,
            device_type=device,
            compute_dtype=self.compute_dtype(),
        )

    def configure_model(self) -> None:
        """Build the policy (and the frozen reference if needed); shard them under FSDP2.

        Idempotent: Lightning may call it more than once (fit, then validate, then reload).
        """
        if self.policy is not None:
            return
        self.check_inputs()
        self.build_policy()
        if self.wants_live_reference():
            self.build_reference()

    def build_policy(self) -> nn.Module:
        """Load the trainable policy into ``self.policy`` (with ``peft``: wrapped with the
        adapters, after loading and before FSDP2 sharding)."""
        policy = self.load_model(self.model_name).train()  # from_pretrained returns eval mode
        check_model_fits_data(self, policy, self.model_name)  # not inside the embedding lookup
        policy.config.use_cache = False
        if self.gradient_checkpointing and self._fsdp_mesh() is None:
            policy.activation_checkpointing_enable({"use_reentrant": False})
        if self.peft is not None:
            policy = apply_lora(policy, self.peft)
            keep_adapters_only(self)
        self.policy = self._prepare(policy, activation_checkpointing=self.gradient_checkpointing)
        return self.policy

    def build_reference(self) -> nn.Module:
        """Load the frozen reference into ``self.reference`` (eval mode, no gradients); nothing
        when the reference is the policy with its adapters off (:attr:`adapters_are_reference`)."""
        if self.adapters_are_reference:
            return self.policy
        reference = self.load_model(self.reference_model_name).eval().requires_grad_(False)
        check_model_fits_data(self, reference, self.reference_model_name)
        self.reference = self._prepare(reference, activation_checkpointing=False)
        return self.reference

    def prepare_data(self) -> None:
        self.check_inputs()

    def _fsdp_mesh(self):
        trainer = self._trainer
        if trainer is None or not isinstance(trainer.strategy, ModelParallelStrategy):
            return None
        return self.device_mesh

    def _prepare(self, lm: nn.Module, activation_checkpointing: bool) -> nn.Module:
        """Bind the token-logps forward; shard with FSDP2 when the strategy asks for it."""
        bind_token_logps(lm)
        param_dtype = parse_dtype(self.fsdp_param_dtype) if self.fsdp_param_dtype else None
        compile_options = {"dynamic": True, **(self.compile_options or {})}
        return prepare_for_training(
            lm,
            self._fsdp_mesh(),
            param_dtype=param_dtype,
            activation_checkpointing=activation_checkpointing,
            cpu_offload=self.fsdp_cpu_offload,
            compile_options=compile_options if self.compile else None,
        )

    def train(self, mode: bool = True):
        # Lightning switches the whole module to train mode each epoch; the reference stays
        # in eval mode (no dropout), as a frozen model should.
        super().train(mode)
        if self.reference is not None:
            self.reference.eval()
        return self

    # ---- forward pieces (override these) ---------------------------------------------------

    def uses_packing(self, lm: nn.Module) -> bool:
        """Pack the pairs into one padding-free row? Auto: with flash-attention (varlen)."""
        if self.packing is not None:
            return self.packing
        return uses_flash_attention(lm)

    def model_token_logps(self, lm: nn.Module, batch: dict[str, torch.Tensor]) -> dict:
        """``{side: [B, T_side]}`` token log-probs of ``lm`` on both responses, one forward."""
        softcap = self.softcap if self.softcap is not None else model_softcap(lm)
        if uses_shared_prompt(lm, self.shared_prompt, batch):
            packed = self.uses_packing(lm)
            return shared_prompt_token_logps(lm, batch, self.logp_chunk_size, softcap, packed)
        if self.uses_packing(lm):
            return packed_token_logps(lm, batch, self.logp_chunk_size, softcap)
        return padded_token_logps(lm, batch, self.logp_chunk_size, softcap, self._pad_id())

    def forward_logps(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The policy's token log-probs, ``{side: [B, T_side]}``."""
        return self.model_token_logps(self.policy, batch)

    def reference_logps(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
        """The reference's token log-probs ``{side: [B, T_side]}`` for a loss that uses them:
        cached in the batch, or a live reference's forward; None for a reference-free loss."""
        if not self.needs_reference:
            return None
        if all(field(side, "ref_token_logps") in batch for side in SIDES):
            return {side: batch[field(side, "ref_token_logps")] for side in SIDES}
        if self.reference is None and self.adapters_are_reference:
            with torch.no_grad(), adapters_disabled(self.policy):
                return self.model_token_logps(self.policy, batch)
        if self.reference is None:
            raise ConfigError(
                f"{type(self.loss).__name__} needs reference log-probabilities, but the batch "
                "has no chosen_ref_token_logps and no reference model is loaded: let the reward "
                "source cache them (data.rewards with store_reference_logps: true) or set "
                "model.live_reference: null."
            )
        with torch.no_grad():
            return self.model_token_logps(self.reference, batch)

    def pair_scores(self, batch: dict[str, torch.Tensor]) -> PairScores:
        """What the loss and the regularizer see: policy, reference and the batch's rewards."""
        return PairScores.from_batch(batch, self.forward_logps(batch), self.reference_logps(batch))

    def compute_loss(
        self, batch: dict[str, torch.Tensor], stage: str = "train"
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """Total loss ``mean(L_seq + alpha * w * (L_REG_w + L_REG_l))`` and what metrics need:
        ``{"pair": PairScores, "loss_output": LossOutput, "regularizer_output": ... | None}``."""
        # Before any embedding lookup: an id past the table is a clear error here, a CUDA
        # device-side assert inside the forward. (Not in on_before_batch_transfer: a datamodule
        # that defines that hook would silently replace this one.)
        check_batch_fits(batch, self)
        pair = self.pair_scores(batch)
        out: LossOutput = self.loss(pair)
        losses = out.losses
        reg: RegularizerOutput | None = None
        if self.regularizer is not None:
            reg = self.regularizer(pair, out)
            losses = losses + reg.losses
        return losses.mean(), {"pair": pair, "loss_output": out, "regularizer_output": reg}

    def log_metrics(
        self, stage: str, loss: torch.Tensor, outputs: dict[str, Any], batch: dict
    ) -> None:
        """Log ``{stage}/loss`` and the preference metrics (synced across processes)."""
        batch_size = batch[field("chosen", "input_ids")].shape[0]
        on_step = stage == "train"
        self.log(
            f"{stage}/loss",
            loss.detach(),
            on_step=on_step,
            on_epoch=True,
            prog_bar=True,
            sync_dist=True,
            batch_size=batch_size,
        )
        updated = getattr(self, f"{stage}_metrics").update_from(
            outputs["pair"], outputs["loss_output"], outputs.get("regularizer_output")
        )
        for name, metric in updated.items():
            self.log(
                f"{stage}/{name}",
                metric,
                on_step=on_step,
                on_epoch=True,
                sync_dist=True,
                batch_size=batch_size,
            )

    # ---- Lightning hooks ------------------------------------------------------------------

    def on_train_batch_start(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        # Dropout masks (lora_dropout) from the run's seed, step and rank: a resumed run draws
        # the masks of the run that never stopped (checkpoints hold no random state).
        seed_step(self.global_step, batch_idx, self.global_rank)
        if self._fsdp_mesh() is not None:
            # FSDP2 syncs gradients only on the micro-batch that ends an accumulation window
            # (Lightning's no-sync context covers DDP only); the loop's own rule tells which.
            last = not self.trainer.fit_loop._should_accumulate()
            set_gradient_sync(self.policy, last or self.fsdp_sync_every_micro_batch)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss, outputs = self.compute_loss(batch, "train")
        self.log_metrics("train", loss, outputs, batch)
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss, outputs = self.compute_loss(batch, "val")
        self.log_metrics("val", loss, outputs, batch)
        return loss

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss, outputs = self.compute_loss(batch, "test")
        self.log_metrics("test", loss, outputs, batch)
        return loss

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """Lightning's clipping, except by norm under FSDP1 (``FSDPStrategy``): Lightning's
        ``FSDPPrecision`` refuses that, since each rank holds only a shard of every gradient.
        The root FSDP module's ``clip_grad_norm_`` computes the norm over all shards (a
        collective: every rank calls it here) and scales every shard by the same factor."""
        from treg_lightning.models.parallel import fsdp1_root

        root = fsdp1_root(self)
        if root is not None and gradient_clip_val and (gradient_clip_algorithm or "norm") == "norm":
            root.clip_grad_norm_(gradient_clip_val)
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def configure_optimizers(self):
        params = [p for p in self.policy.parameters() if p.requires_grad]
        if self.optimizer_factory is None:
            optimizer = torch.optim.AdamW(params, lr=1e-6, weight_decay=0.0)
        else:
            optimizer = self.optimizer_factory(params)
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer)
        if isinstance(scheduler, WarmupCosineLR) and scheduler.num_training_steps is None:
            scheduler.num_training_steps = estimated_training_steps(self.trainer)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # The frozen reference is rebuilt from `reference_model` on load; storing it would double
        # the checkpoint. Sharded (FSDP) checkpoints keep it: their strategies load every key of
        # the module's state dict back from the shards.
        state = checkpoint.get("state_dict")
        if state and self.reference is not None and not self._sharded_strategy():
            for key in [k for k in state if k.startswith("reference.")]:
                del state[key]

    def _sharded_strategy(self) -> bool:
        strategy = self._trainer.strategy if self._trainer is not None else None
        return isinstance(strategy, (FSDPStrategy, ModelParallelStrategy))

    @classmethod
    def load_from_checkpoint(
        cls,
        checkpoint_path,
        map_location=None,
        hparams_file=None,
        strict: bool | None = None,
        weights_only: bool | None = None,
        **kwargs: Any,
    ):
        """Lightning's ``load_from_checkpoint``, with a ``.ckpt`` file's hyperparameters in
        today's names first (:func:`~treg_lightning.models.renames.upgrade_hparams`: class paths
        of modules that have moved since, the regularizer's older ``token_rewards``), as every
        ``treg`` verb reads them. ``kwargs`` still override the checkpoint's values."""
        if hparams_file is None and isinstance(checkpoint_path, (str, Path)):
            path = Path(checkpoint_path).expanduser()
            if path.is_file():
                saved = load_checkpoint(path, "checkpoint_path").get("hyper_parameters") or {}
                upgraded = upgrade_hparams(dict(saved), source=str(path))
                changed = {k: v for k, v in upgraded.items() if saved.get(k) != v}
                kwargs = {**changed, **kwargs}
        return super().load_from_checkpoint(
            checkpoint_path, map_location, hparams_file, strict, weights_only, **kwargs
        )

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        reopen_cut_epoch(checkpoint)  # a max_steps stop mid-epoch resumes at its next batch
        state = checkpoint.get("state_dict")
        if (
            state
            and self.reference is not None
            and not any(k.startswith("reference.") for k in state)
        ):
            state.update({f"reference.{k}": v for k, v in self.reference.state_dict().items()})

    def _pad_id(self) -> int:
        config = self.policy.config if self.policy is not None else None
        pad = getattr(config, "pad_token_id", None)
        return int(pad) if isinstance(pad, int) else 0


def _initialized(value):
    """``value``; for a jsonargparse ``lazy_instance`` (the defaults of ``loss`` and
    ``regularizer``), a new instance of the class it stands for, built now from its init
    arguments (its public ``lazy_get_init_args()``): its properties then read real attributes,
    and no two modules share the default's one object."""
    if callable(getattr(value, "lazy_get_init_args", None)):
        return real_class(value)(**value.lazy_get_init_args().as_dict())
    return value
