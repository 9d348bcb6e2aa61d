"""What kind of model a folder or config is, told from its small files, never its weights.

Loading a model of the wrong kind does not always fail: ``AutoModelForCausalLM`` loads a reward
model's backbone under a freshly initialized ``lm_head``, ``AutoModelForSequenceClassification``
puts a random two-output score head on a causal LM, and a LoRA adapter folder holds no model at
all. The kind is read from ``config.architectures`` (what ``save_pretrained`` wrote) and from
``adapter_config.json``; :mod:`treg_lightning.models.preflight` runs the start-up check of a
model argument on top of this, :mod:`treg_lightning.models.loading` names an adapter folder
when one is given as a model.
"""

from __future__ import annotations

import json
from pathlib import Path

from transformers.models.auto.modeling_auto import (
    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
)

from treg_lightning.errors import ConfigError

CAUSAL_LM = "causal LM"
SEQUENCE_CLASSIFIER = "sequence classifier"
OTHER = "model of another kind"  # a known architecture that is neither (no head, seq2seq, ...)
UNKNOWN = "model of an unknown kind"  # remote code or a config naming no architecture
ADAPTER_CONFIG = "adapter_config.json"

_CAUSAL_CLASSES = frozenset(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
_CLASSIFIER_CLASSES = frozenset(MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES.values())


def architecture(config) -> str | None:
    """The first class name of ``config.architectures`` (None when it names none)."""
    names = getattr(config, "architectures", None) or []
    return names[0] if names else None


def config_kind(config) -> str:
    """:data:`CAUSAL_LM`, :data:`SEQUENCE_CLASSIFIER`, :data:`OTHER` or :data:`UNKNOWN`.

    The architecture's class name decides: a class of transformers' causal-LM or
    sequence-classification auto mappings, else the usual suffix (remote-code models follow the
    naming); a known model type saved as another class (``LlamaModel``, a token classifier) is
    :data:`OTHER`. A config naming no architecture is a causal LM when its model type has one.
    """
    names = list(getattr(config, "architectures", None) or [])
    for name in names:
        if name in _CLASSIFIER_CLASSES or name.endswith("ForSequenceClassification"):
            return SEQUENCE_CLASSIFIER
        if name in _CAUSAL_CLASSES or name.endswith(("ForCausalLM", "LMHeadModel")):
            return CAUSAL_LM
    model_type = getattr(config, "model_type", None)
    known = model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    if not names:
        return CAUSAL_LM if known else UNKNOWN
    known = known or model_type in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES
    return OTHER if known else UNKNOWN


def is_adapter_folder(path: str | Path) -> bool:
    """Whether ``path`` is a PEFT adapter folder without a model of its own
    (``adapter_config.json`` and no ``config.json``)."""
    path = Path(path)
    return (path / ADAPTER_CONFIG).is_file() and not (path / "config.json").is_file()


def adapter_folder_error(
    path: str | Path, setting: str | None = None, name: str | None = None
) -> ConfigError:
    """The error for an adapter folder given where a whole model is needed: what it is, its base
    model, and how to make a model of it.

    Args:
        path: the folder holding ``adapter_config.json`` (a hub repo's cached copy).
        setting: the setting that named it, e.g. ``"data.rewards.positive"``.
        name: the model argument as given (default: ``path``).
    """
    path = Path(path)
    try:
        settings = json.loads((path / ADAPTER_CONFIG).read_text())
    except (OSError, ValueError):
        settings = {}
    base = settings.get("base_model_name_or_path") if isinstance(settings, dict) else None
    method = settings.get("peft_type") if isinstance(settings, dict) else None
    kind = {None: "PEFT", "LORA": "LoRA"}.get(method, str(method))
    about = f" on the base model {base!r}" if base else ""
    name = str(path) if name is None else name
    where = f"{setting} {name!r}" if setting else name
    return ConfigError(
        f"{where} is a {kind} adapter folder ({ADAPTER_CONFIG}{about}), not a whole model: it "
        "holds only the adapter's weights. Give a merged model instead: export the run without "
        "--export.adapter_only (treg export --config <its config> --ckpt_path <its checkpoint> "
        "--output.path <folder> writes the adapters merged into the base weights), or merge it "
        "yourself with peft (PeftModel.from_pretrained(base, folder).merge_and_unload()"
        ".save_pretrained(out)) and give that folder."
    )


def wrong_kind_error(
    where: str, kind: str, arch: str | None, expected: str, num_labels: int | None = None
) -> ConfigError:
    """The error for a model of ``kind`` given where a model of ``expected`` kind is needed
    (``where`` names the setting and the model); says what it is and what to give instead."""
    if kind == SEQUENCE_CLASSIFIER:
        outputs = "" if num_labels is None else f", {num_labels} output{'s' * (num_labels != 1)}"
        what = f"a sequence classifier ({arch or 'no architecture named'}{outputs}: a reward model)"
    else:
        what = f"a {kind}" + (f" ({arch})" if arch else "")
    if expected == CAUSAL_LM:
        need = (
            "not a causal LM: token log-probabilities come from a language-modelling head, which "
            "it lacks (loaded as a causal LM it would get a fresh, random one). Give a causal LM: "
            "a *ForCausalLM folder written by save_pretrained, a .gguf file, a hub id or "
            "'smollm2'."
        )
    else:
        need = (
            "not a reward model (a sequence classifier with one output, num_labels=1): loaded as "
            "one it would get a fresh, random score head. Give a reward model, or score by the "
            "implicit reward of a policy against its reference (ImplicitRewardScorer in "
            "treg_lightning.answers.scorers)."
        )
    return ConfigError(f"{where} is {what}, {need}")
