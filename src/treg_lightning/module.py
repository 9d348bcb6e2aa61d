"""``PreferenceModule``: DPO / IPO / SimPO (any :class:`PreferenceLoss`) with the T-REG regularizer.

The loss, the regularizer, the optimizer and the scheduler are injected (``class_path`` in
YAML); the models are built in an idempotent ``configure_model()``, sharded with FSDP2 when the
strategy is ``ModelParallelStrategy``. One training step:

1. ``forward_logps``: chosen and rejected are concatenated along the batch and go through the
   policy in ONE forward; per-token log-probs come from the final hidden states in chunks
   (:func:`treg_lightning.logprobs.token_logps_from_hidden`), never as full float32 logits;
2. ``reference_logps``: cached reference token log-probs from the batch, or a frozen reference
   model's forward, or None for reference-free losses;
3. ``compute_loss``: ``mean(loss.losses + regularizer.losses)`` and the metrics;
4. ``log_metrics``: ``train/*`` and ``val/*`` via :mod:`treg_lightning.metrics`.

Each step is a small method, so a subclass overrides exactly the piece it changes.
"""

from __future__ import annotations

import functools
import inspect
import math
from types import MethodType
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from jsonargparse import lazy_instance
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn

from treg_lightning.logprobs import sequence_logps, token_logps_from_hidden
from treg_lightning.losses import SimPOLoss, TokenRewardRegularizer
from treg_lightning.losses.base import LossOutput
from treg_lightning.losses.treg import RegularizerOutput
from treg_lightning.metrics import PreferenceMetrics
from treg_lightning.shared_prompt_forward import shared_prompt_token_logps, uses_shared_prompt

SIDES = ("chosen", "rejected")


class WarmupCosineLR(torch.optim.lr_scheduler.LRScheduler):
    """Linear warmup from 0, then cosine decay to ``min_lr_ratio * lr`` (SimPO's schedule).

    Stepped once per optimizer step. ``num_training_steps`` is filled in by
    :class:`PreferenceModule` from ``trainer.estimated_stepping_batches`` when left as None.

    Args:
        optimizer: the optimizer whose learning rates are scheduled.
        warmup_ratio: share of the training steps spent warming up (0.1 in the paper).
        num_training_steps: total optimizer steps; None = set by the module.
        min_lr_ratio: final learning rate as a share of the peak.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        warmup_ratio: float = 0.1,
        num_training_steps: int | None = None,
        min_lr_ratio: float = 0.0,
    ) -> None:
        if not 0 <= warmup_ratio <= 1:
            raise ValueError(f"WarmupCosineLR: warmup_ratio must be in [0, 1], got {warmup_ratio}.")
        self.warmup_ratio = warmup_ratio
        self.num_training_steps = num_training_steps
        self.min_lr_ratio = min_lr_ratio
        super().__init__(optimizer)

    def lr_factor(self, step: int) -> float:
        total = max(1, self.num_training_steps or 1)
        warmup = math.ceil(self.warmup_ratio * total)
        if step < warmup:
            return step / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * cosine

    def get_lr(self) -> list[float]:
        factor = self.lr_factor(self.last_epoch)
        return [base_lr * factor for base_lr in self.base_lrs]


def cosine_with_warmup(
    optimizer: torch.optim.Optimizer, num_training_steps: int, warmup_ratio: float = 0.1
) -> WarmupCosineLR:
    """Functional form of :class:`WarmupCosineLR` for use outside the module."""
    return WarmupCosineLR(optimizer, warmup_ratio, num_training_steps)


def _policy_token_logps(
    lm: nn.Module,
    model_inputs: dict[str, Any],
    score_mask: torch.Tensor,
    chunk_size: int,
    softcap: float | None,
) -> torch.Tensor:
    """``[batch, seq]`` token log-probs of a Hugging Face causal LM, via its final hidden states.

    ``model_inputs`` go to the base model (``input_ids`` and either ``attention_mask`` or the
    packed-row arguments). Bound to the model as ``lm.token_logps`` and registered as an FSDP2
    forward method, so the root unit (which owns ``lm_head``) is unsharded while
    ``lm_head.weight`` is read here.
    """
    base = getattr(lm, lm.base_model_prefix)
    hidden = base(**model_inputs)[0]
    head = lm.get_output_embeddings()
    return token_logps_from_hidden(
        hidden,
        head.weight,
        model_inputs["input_ids"],
        score_mask,
        chunk_size=chunk_size,
        softcap=softcap,
        lm_head_bias=getattr(head, "bias", None),
    )


def _pad_to(tensor: torch.Tensor, length: int, value: float | int | bool) -> torch.Tensor:
    return F.pad(tensor, (0, length - tensor.shape[1]), value=value)


def concat_pairs(batch: dict[str, torch.Tensor], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Stack chosen over rejected (``[2 * batch, seq]``), right-padding to the longer side."""
    length = max(batch["chosen_input_ids"].shape[1], batch["rejected_input_ids"].shape[1])
    out = {}
    for key, value in (("input_ids", pad_id), ("attention_mask", 0), ("response_mask", False)):
        out[key] = torch.cat([_pad_to(batch[f"{side}_{key}"], length, value) for side in SIDES])
    return out


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
        reference_model: the frozen reference; None = the same weights as ``model``.
        live_reference: whether to load the reference model. None (auto) loads it only when the
            loss needs a reference and the datamodule serves no cached reference log-probs;
            False never loads it (start-up fails if the loss needs one and none is cached).
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
            sequence (:mod:`treg_lightning.data.shared_prompt`); same log-probs, losses and
            gradients. None (auto): on unless the model runs flash-attention (its varlen kernel
            cannot express the mask) or a batch's sides differ in their prompts; measured
            faster on CPU at HH-RLHF lengths, see :mod:`treg_lightning.shared_prompt_forward`.
        fsdp_param_dtype: FSDP2 compute dtype of the all-gathered parameters (``"bfloat16"`` on
            GPU); None keeps the stored dtype. Only used under ``ModelParallelStrategy``.
        fsdp_cpu_offload: FSDP2 offloads parameters, gradients and optimizer states to CPU.
        compile: ``torch.compile`` each decoder layer of the policy (after sharding). Off by
            default: on the CPU benchmark it gained nothing measurable (bench/README.md).
        compile_options: keyword arguments for ``torch.compile`` (default ``{"dynamic": True}``:
            sequence lengths change from batch to batch).
        trust_remote_code: allow model code from the hub.
    """

    def __init__(
        self,
        model: str,
        loss: nn.Module = lazy_instance(SimPOLoss),
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
        compile: bool = False,
        compile_options: dict[str, Any] | None = None,
        trust_remote_code: bool = False,
    ) -> None:
        super().__init__()
        _portable_hparams(self, locals())
        _check_model_settings(torch_dtype, attn_implementation)
        self.model_name = model
        self.loss = loss
        self.regularizer = regularizer
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

    def data_has_reference_logps(self, datamodule=None) -> bool | None:
        """Whether the datamodule serves cached reference token log-probs (None: unknown).

        ``datamodule`` defaults to the one attached to the trainer.
        """
        if datamodule is None and self._trainer is not None:
            datamodule = getattr(self._trainer, "datamodule", None)
        if datamodule is None:
            return None
        value = getattr(datamodule, "serves_reference_logps", None)
        if value is not None:
            return value() if callable(value) else bool(value)
        # PreferenceDataModule caches reference logps in its annotate pass when asked to.
        if hasattr(datamodule, "rewards") and hasattr(datamodule, "store_reference_logps"):
            return datamodule.rewards == "annotate" and bool(datamodule.store_reference_logps)
        return None

    def wants_live_reference(self) -> bool:
        if self.live_reference is not None:
            return self.live_reference
        return self.needs_reference and not self.data_has_reference_logps()

    def load_model(self, name_or_path: str) -> nn.Module:
        """Load one causal LM (override to build models differently, e.g. with LoRA)."""
        from treg_lightning.models import load_causal_lm

        device = self._trainer.strategy.root_device.type if self._trainer is not None else None
        return load_causal_lm(
            name_or_path,
            torch_dtype=self.torch_dtype,
            attn_implementation=self.attn_implementation,
            trust_remote_code=self.trust_remote_code,
            device_type=device,
        )

    def configure_model(self) -> None:
        """Build the policy (and the frozen reference if needed); shard them under FSDP2.

        Idempotent: Lightning may call it more than once (fit, then validate, then reload).
        """
        if self.policy is not None:
            return
        self.check_reference_available()
        self.build_policy()
        if self.wants_live_reference():
            self.build_reference()

    def build_policy(self) -> nn.Module:
        """Load the trainable policy into ``self.policy``."""
        policy = self.load_model(self.model_name).train()  # from_pretrained returns eval mode
        tokenizer = getattr(getattr(self._trainer, "datamodule", None), "tokenizer", None)
        if tokenizer is not None:  # before the first forward, not inside the embedding lookup
            from treg_lightning.models import check_vocab_fits

            check_vocab_fits(tokenizer, policy, self.model_name)
        policy.config.use_cache = False
        if self.gradient_checkpointing and self._fsdp_mesh() is None:
            policy.gradient_checkpointing_enable({"use_reentrant": False})
        self.policy = self._prepare(policy, activation_checkpointing=self.gradient_checkpointing)
        return self.policy

    def build_reference(self) -> nn.Module:
        """Load the frozen reference into ``self.reference`` (eval mode, no gradients)."""
        reference = self.load_model(self.reference_model_name).eval().requires_grad_(False)
        self.reference = self._prepare(reference, activation_checkpointing=False)
        return self.reference

    def check_reference_available(self, datamodule=None) -> None:
        """Fail at start-up, not mid-epoch, when a reference is needed but none can be had.

        Called by ``prepare_data`` (before the annotate pass), ``configure_model`` and the CLI.
        """
        if not self.needs_reference or self.live_reference is not False:
            return
        if self.data_has_reference_logps(datamodule) is False:
            raise ValueError(
                f"{type(self.loss).__name__} needs reference log-probabilities, but "
                "model.live_reference is false and the data serves no cached reference "
                "logps. Either set data.store_reference_logps: true (with data.rewards: "
                "annotate, the annotate pass caches them) or set model.live_reference: null "
                "to load the reference model."
            )

    def prepare_data(self) -> None:
        self.check_reference_available()

    def _fsdp_mesh(self):
        from lightning.pytorch.strategies import ModelParallelStrategy

        trainer = self._trainer
        if trainer is None or not isinstance(trainer.strategy, ModelParallelStrategy):
            return None
        return self.device_mesh

    def _prepare(self, lm: nn.Module, activation_checkpointing: bool) -> nn.Module:
        """Bind the token-logps forward and shard with FSDP2 when the strategy asks for it."""
        from torch.distributed.fsdp import register_fsdp_forward_method

        from treg_lightning.models import parse_dtype
        from treg_lightning.parallel import apply_fsdp2, decoder_layers

        lm.token_logps = MethodType(_policy_token_logps, lm)
        mesh = self._fsdp_mesh()
        if mesh is not None:
            param_dtype = parse_dtype(self.fsdp_param_dtype) if self.fsdp_param_dtype else None
            apply_fsdp2(
                lm,
                mesh,
                param_dtype=param_dtype,
                activation_checkpointing=activation_checkpointing,
                cpu_offload=self.fsdp_cpu_offload,
            )
            register_fsdp_forward_method(lm, "token_logps")
        if self.compile:
            options = {"dynamic": True, **(self.compile_options or {})}
            for layer in decoder_layers(lm):
                layer.compile(**options)
        return lm

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
        return "flash" in str(getattr(lm.config, "_attn_implementation", ""))

    def model_token_logps(self, lm: nn.Module, batch: dict[str, torch.Tensor]) -> dict:
        """``{chosen,rejected}_token_logps`` ``[batch, seq]`` of ``lm`` in one forward."""
        softcap = self.softcap
        if softcap is None:
            softcap = getattr(lm.config, "final_logit_softcapping", None)
        if uses_shared_prompt(lm, self.shared_prompt, batch):
            packed = self.uses_packing(lm)
            return shared_prompt_token_logps(lm, batch, self.logp_chunk_size, softcap, packed)
        if self.uses_packing(lm):
            return self._packed_token_logps(lm, batch, softcap)
        pair = concat_pairs(batch, pad_id=self._pad_id(batch))
        model_inputs = {
            "input_ids": pair["input_ids"],
            "attention_mask": pair["attention_mask"],
            "use_cache": False,
        }
        token_logps = lm.token_logps(
            model_inputs, pair["response_mask"], self.logp_chunk_size, softcap
        )
        n = batch["chosen_input_ids"].shape[0]
        return {
            "chosen_token_logps": token_logps[:n, : batch["chosen_input_ids"].shape[1]],
            "rejected_token_logps": token_logps[n:, : batch["rejected_input_ids"].shape[1]],
        }

    def _packed_token_logps(self, lm: nn.Module, batch: dict, softcap: float | None) -> dict:
        """As the padded path, with all ``2B`` sequences packed into one ``[1, N]`` row."""
        from treg_lightning.data.packing import pack_batch, packed_model_inputs, unpack_pairs

        packed = pack_batch(batch)
        model_inputs = packed_model_inputs(
            packed, lm.config._attn_implementation, dtype=lm.get_output_embeddings().weight.dtype
        )
        token_logps = lm.token_logps(
            model_inputs, packed["response_mask"], self.logp_chunk_size, softcap
        )
        chosen, rejected = unpack_pairs(token_logps, packed)
        return {"chosen_token_logps": chosen, "rejected_token_logps": rejected}

    def forward_logps(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Policy log-probs: ``*_token_logps`` ``[batch, seq]`` and ``*_logps`` ``[batch]``."""
        out = self.model_token_logps(self.policy, batch)
        for side in SIDES:
            mask = batch[f"{side}_response_mask"]
            out[f"{side}_logps"] = sequence_logps(out[f"{side}_token_logps"], mask)
        return out

    def reference_logps(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
        """Reference ``*_ref_token_logps`` / ``*_ref_logps``: cached, live, or None."""
        if "chosen_ref_token_logps" in batch:
            out = {f"{s}_ref_token_logps": batch[f"{s}_ref_token_logps"] for s in SIDES}
        elif self.reference is not None:
            with torch.no_grad():
                logps = self.model_token_logps(self.reference, batch)
            out = {f"{s}_ref_token_logps": logps[f"{s}_token_logps"] for s in SIDES}
        elif self.needs_reference:
            raise ValueError(
                f"{type(self.loss).__name__} needs reference log-probabilities, but the batch "
                "has no chosen_ref_token_logps and no reference model is loaded: cache them "
                "(data.store_reference_logps: true) or set model.live_reference: null."
            )
        else:
            return None
        for side in SIDES:
            mask = batch[f"{side}_response_mask"]
            out[f"{side}_ref_logps"] = sequence_logps(out[f"{side}_ref_token_logps"], mask)
        return out

    def compute_loss(
        self, batch: dict[str, torch.Tensor], stage: str = "train"
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """Total loss ``mean(L_seq + alpha * w * (L_REG_w + L_REG_l))`` and what metrics need."""
        logps = self.forward_logps(batch)
        ref = self.reference_logps(batch)
        lengths = {s: batch[f"{s}_response_mask"].sum(-1) for s in SIDES}
        out: LossOutput = self.loss(
            logps["chosen_logps"],
            logps["rejected_logps"],
            lengths["chosen"],
            lengths["rejected"],
            ref["chosen_ref_logps"] if ref else None,
            ref["rejected_ref_logps"] if ref else None,
        )
        losses = out.losses
        reg: RegularizerOutput | None = None
        if self.regularizer is not None:
            reg = self.regularizer(
                out,
                logps["chosen_token_logps"],
                batch["chosen_response_mask"],
                batch.get("chosen_token_rewards"),
                logps["rejected_token_logps"],
                batch["rejected_response_mask"],
                batch.get("rejected_token_rewards"),
                ref["chosen_ref_token_logps"] if ref else None,
                ref["rejected_ref_token_logps"] if ref else None,
            )
            losses = losses + reg.losses
        loss = losses.mean()
        return loss, {"loss_output": out, "regularizer_output": reg, "logps": logps, "ref": ref}

    def log_metrics(
        self, stage: str, loss: torch.Tensor, outputs: dict[str, Any], batch: dict
    ) -> None:
        """Log ``{stage}/loss`` and the preference metrics (synced across processes)."""
        batch_size = batch["chosen_input_ids"].shape[0]
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
            batch,
            outputs["loss_output"],
            outputs.get("regularizer_output"),
            outputs.get("logps"),
            outputs.get("ref"),
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
            scheduler.num_training_steps = int(self.trainer.estimated_stepping_batches)
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
        from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

        strategy = self._trainer.strategy if self._trainer is not None else None
        return isinstance(strategy, (FSDPStrategy, ModelParallelStrategy))

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("state_dict")
        if (
            state
            and self.reference is not None
            and not any(k.startswith("reference.") for k in state)
        ):
            state.update({f"reference.{k}": v for k, v in self.reference.state_dict().items()})

    def _pad_id(self, batch: dict[str, torch.Tensor]) -> int:
        config = self.policy.config if self.policy is not None else None
        pad = getattr(config, "pad_token_id", None)
        return int(pad) if isinstance(pad, int) else 0


def _check_model_settings(torch_dtype: str, attn_implementation: str | None) -> None:
    """Refuse an unknown dtype or attention kernel at start-up, not when configure_model loads
    the model (after the annotate pass)."""
    from treg_lightning.models import check_attn_implementation, parse_dtype

    parse_dtype(torch_dtype)
    check_attn_implementation(attn_implementation)


def _portable_hparams(module: L.LightningModule, init_args: dict[str, Any]) -> None:
    """Save hyperparameters that reload without the CLI.

    Under the CLI the hyperparameters are already the parsed config (plain values). Outside it,
    injected objects (the loss, the regularizer, optimizer/scheduler partials) are stored as
    ``{"class_path", "init_args"}`` and instantiated back by jsonargparse on
    ``load_from_checkpoint``; objects that cannot be described are left out (pass them again).
    """
    from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters

    args = {k: v for k, v in init_args.items() if k not in ("self", "__class__")}
    under_cli = _given_hyperparameters.get() is not None
    injected = {} if under_cli else {k: v for k, v in args.items() if _is_object(v)}
    module.save_hyperparameters(ignore=list(injected), frame=inspect.currentframe().f_back)
    if not injected:
        return
    described = {k: _describe(v) for k, v in injected.items()}
    module.hparams.update({k: v for k, v in described.items() if v is not None})
    module.hparams["_instantiator"] = "lightning.pytorch.cli.instantiate_module"


def _is_object(value: Any) -> bool:
    return isinstance(value, nn.Module) or callable(value)


def _describe(value: Any) -> dict[str, Any] | None:
    """``{"class_path", "init_args"}`` for a module or a ``partial(cls, **kwargs)``, else None."""
    if isinstance(value, functools.partial) and isinstance(value.func, type) and not value.args:
        return {"class_path": _class_path(value.func), "init_args": dict(value.keywords)}
    if isinstance(value, type):
        return {"class_path": _class_path(value)}
    if not isinstance(value, nn.Module):
        return None
    # jsonargparse's lazy_instance subclasses the real class; describe the real one.
    cls = next(c for c in type(value).__mro__ if not c.__module__.startswith("jsonargparse"))
    params = list(inspect.signature(cls.__init__).parameters)[1:]
    init_args = {name: getattr(value, name) for name in params if hasattr(value, name)}
    if not all(isinstance(v, (int, float, str, bool, type(None))) for v in init_args.values()):
        return None
    return {"class_path": _class_path(cls), "init_args": init_args}


def _class_path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"
