"""The few numbers of a decoder-only model that its memory depends on, read without weights.

:func:`resolve_shape` turns a model name (as ``model.model`` takes it) into a :class:`ModelShape`,
reading only a ``config.json``, from the first of:

1. a local ``save_pretrained`` folder, or the header of a ``.gguf`` file;
2. the alias ``"smollm2"``: its converted folder when it exists, else the shipped shape (the
   conversion itself would read the weights);
3. the local Hugging Face cache (``huggingface_hub.try_to_load_from_cache``);
4. the shapes shipped here for the paper's models (:data:`SHIPPED_SHAPES`), so that
   ``treg plan`` works offline on the shipped configs;
5. the hub, when ``HF_HUB_OFFLINE`` is not set (``config.json`` only).

Otherwise :class:`PlanError`: pass a local folder holding the model's ``config.json``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path

from treg_lightning.errors import UserError

SMOLLM2_ALIAS = "smollm2"
# Decoder layers whose saved activations treg_lightning.plan.activations models exactly.
LLAMA_LIKE = frozenset({"llama", "mistral", "qwen2"})
GEMMA_LIKE = frozenset({"gemma", "gemma2"})


class PlanError(UserError, ValueError):
    """A plan cannot be made (unknown model offline, unusable setting); the message says why."""


@dataclass(frozen=True)
class ModelShape:
    """Shape of a decoder-only causal LM.

    Attributes:
        model_type: ``config.model_type`` (``"llama"``, ``"gemma2"``, ...).
        hidden_size: width of the residual stream.
        intermediate_size: width of the gated MLP.
        num_layers: decoder layers.
        num_heads: query heads.
        num_kv_heads: key/value heads (grouped-query attention when fewer than ``num_heads``).
        head_dim: width of one head.
        vocab_size: rows of the embedding and of the output projection.
        tied_embeddings: the output projection is the input embedding.
        final_logit_softcapping: Gemma-2's final-logit cap, or None.
        attn_logit_softcapping: Gemma-2's attention-logit cap, or None.
        attention_bias: biases on q, k, v and o (Llama's ``attention_bias``).
        qkv_bias: biases on q, k and v only (Qwen2).
        mlp_bias: biases on the MLP projections.
        source: where the numbers came from (printed by ``treg plan``).
        param_count: exact parameter count when it was counted on a meta-device model
            (architectures outside the modelled families), else None (counted from the shape).
    """

    model_type: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    tied_embeddings: bool
    final_logit_softcapping: float | None = None
    attn_logit_softcapping: float | None = None
    attention_bias: bool = False
    qkv_bias: bool = False
    mlp_bias: bool = False
    source: str = "given"
    param_count: int | None = None

    @property
    def modelled(self) -> bool:
        """Whether the decoder layer is one of the families whose activations are modelled."""
        return self.model_type in LLAMA_LIKE | GEMMA_LIKE

    @property
    def norms_per_layer(self) -> int:
        return 4 if self.model_type == "gemma2" else 2

    def linear_dims(self) -> dict[str, tuple[int, int]]:
        """``{name: (in_features, out_features)}`` of the linear layers of one decoder layer."""
        h, i = self.hidden_size, self.intermediate_size
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        return {
            "q_proj": (h, q),
            "k_proj": (h, kv),
            "v_proj": (h, kv),
            "o_proj": (q, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }

    def layer_params(self) -> int:
        """Parameters of one decoder layer (projections, their biases, the norms)."""
        dims = self.linear_dims()
        count = sum(fan_in * fan_out for fan_in, fan_out in dims.values())
        if self.attention_bias or self.qkv_bias:
            count += sum(dims[name][1] for name in ("q_proj", "k_proj", "v_proj"))
        if self.attention_bias:
            count += dims["o_proj"][1]
        if self.mlp_bias:
            count += sum(dims[name][1] for name in ("gate_proj", "up_proj", "down_proj"))
        return count + self.norms_per_layer * self.hidden_size

    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size

    def head_params(self) -> int:
        """Parameters of the output projection that are not the embedding's (0 when tied)."""
        return 0 if self.tied_embeddings else self.vocab_size * self.hidden_size

    def num_params(self) -> int:
        """All parameters: embedding, decoder layers, final norm, untied output projection."""
        if self.param_count is not None:
            return self.param_count
        return (
            self.embedding_params()
            + self.num_layers * self.layer_params()
            + self.hidden_size
            + self.head_params()
        )


_LLAMA3_8B = ModelShape(
    model_type="llama",
    hidden_size=4096,
    intermediate_size=14336,
    num_layers=32,
    num_heads=32,
    num_kv_heads=8,
    head_dim=128,
    vocab_size=128256,
    tied_embeddings=False,
)
_GEMMA2_9B = ModelShape(
    model_type="gemma2",
    hidden_size=3584,
    intermediate_size=14336,
    num_layers=42,
    num_heads=16,
    num_kv_heads=8,
    head_dim=256,
    vocab_size=256000,
    tied_embeddings=True,
    final_logit_softcapping=30.0,
    attn_logit_softcapping=50.0,
)
_SMOLLM2_135M = ModelShape(
    model_type="llama",
    hidden_size=576,
    intermediate_size=1536,
    num_layers=30,
    num_heads=9,
    num_kv_heads=3,
    head_dim=64,
    vocab_size=49152,
    tied_embeddings=True,
)
# From the models' published config.json files (hub ids as the shipped configs name them).
SHIPPED_SHAPES: dict[str, ModelShape] = {
    "meta-llama/Meta-Llama-3-8B": _LLAMA3_8B,
    "meta-llama/Meta-Llama-3-8B-Instruct": _LLAMA3_8B,
    "google/gemma-2-9b": _GEMMA2_9B,
    "google/gemma-2-9b-it": _GEMMA2_9B,
    "HuggingFaceTB/SmolLM2-135M-Instruct": _SMOLLM2_135M,
    SMOLLM2_ALIAS: _SMOLLM2_135M,
}


def shape_from_config(config, source: str = "config") -> ModelShape:
    """A :class:`ModelShape` from a transformers ``PretrainedConfig`` (class defaults applied)."""
    text = getattr(config, "text_config", None)
    config = text if text is not None and not hasattr(config, "num_hidden_layers") else config
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    shape = ModelShape(
        model_type=config.model_type,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_layers=config.num_hidden_layers,
        num_heads=heads,
        num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=head_dim,
        vocab_size=config.vocab_size,
        tied_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        final_logit_softcapping=getattr(config, "final_logit_softcapping", None),
        attn_logit_softcapping=getattr(config, "attn_logit_softcapping", None),
        attention_bias=bool(getattr(config, "attention_bias", False)),
        qkv_bias=config.model_type == "qwen2",
        mlp_bias=bool(getattr(config, "mlp_bias", False)),
        source=source,
    )
    if not shape.modelled:
        shape = replace(shape, param_count=_count_on_meta(config))
    return shape


def _count_on_meta(config) -> int:
    """Exact parameter count of an architecture outside the modelled families (no memory)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def resolve_shape(
    name_or_path: str,
    trust_remote_code: bool = False,
    cache_dir: str | os.PathLike | None = None,
) -> ModelShape:
    """The shape of ``name_or_path`` from a ``config.json`` alone (see the module docstring).

    Args:
        name_or_path: hub id, local folder, ``.gguf`` file or ``"smollm2"``.
        trust_remote_code: allow a hub config class with custom code.
        cache_dir: the Hugging Face hub cache to look in (default: huggingface_hub's).

    Raises:
        PlanError: the model's config.json cannot be had without the network, or is unusable.
    """
    from transformers import AutoConfig

    name = str(name_or_path)
    path = Path(name).expanduser()
    if name == SMOLLM2_ALIAS:
        from treg_lightning.models.loading import SMOLLM2_FOLDER, cache_root

        folder = cache_root() / "models" / SMOLLM2_FOLDER
        if (folder / "config.json").is_file():
            return _from_folder(folder, trust_remote_code)
        return replace(SHIPPED_SHAPES[name], source="shipped shape (SmolLM2-135M-Instruct)")
    if name.endswith(".gguf") and path.is_file():
        config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
        return shape_from_config(config, source=f"GGUF header of {path}")
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise PlanError(
                f"{path} is a folder but holds no config.json; point at a folder "
                "written by save_pretrained."
            )
        return _from_folder(path, trust_remote_code)
    if name.startswith(("/", "./", "../", "~")):
        raise PlanError(
            f"Model path {path} does not exist; give a save_pretrained folder, a "
            ".gguf file, a hub id or 'smollm2'."
        )
    cached = _cached_config(name, cache_dir)
    if cached is not None:
        return _from_folder(cached.parent, trust_remote_code, source=f"HF cache {cached}")
    if name in SHIPPED_SHAPES:
        return replace(SHIPPED_SHAPES[name], source="shipped shape")
    return _from_hub(name, trust_remote_code)


def _from_folder(
    folder: Path, trust_remote_code: bool = False, source: str | None = None
) -> ModelShape:
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except (ValueError, OSError) as err:
        raise PlanError(f"Cannot read the model config {folder / 'config.json'}: {err}") from err
    return shape_from_config(config, source=source or f"{folder / 'config.json'}")


def _cached_config(repo_id: str, cache_dir) -> Path | None:
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo_id, "config.json", cache_dir=cache_dir)
    except ValueError:  # not a valid repo id
        return None
    return Path(found) if isinstance(found, str) else None


def _from_hub(repo_id: str, trust_remote_code: bool = False) -> ModelShape:
    from huggingface_hub import constants

    advice = (
        f"treg plan needs the config.json of {repo_id!r}: it is not in the local Hugging Face "
        "cache and its shape is not shipped (shipped: "
        f"{', '.join(k for k in SHIPPED_SHAPES if '/' in k)}). Pass a local folder holding "
        "its config.json (--model.model path/to/folder)"
    )
    if constants.HF_HUB_OFFLINE:
        raise PlanError(advice + ", or unset HF_HUB_OFFLINE to fetch it.")
    from huggingface_hub import hf_hub_download

    try:
        path = Path(hf_hub_download(repo_id, "config.json"))
    except Exception as err:  # network, gated repo, unknown id: all mean "no config here"
        raise PlanError(f"{advice}; fetching it failed: {type(err).__name__}: {err}") from err
    return _from_folder(path.parent, trust_remote_code, source=f"hub {repo_id}")
