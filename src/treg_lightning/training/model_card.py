"""The Hugging Face model card (``README.md``) of an exported policy.

YAML metadata first (``base_model``, ``library_name``, ``tags``, ``datasets``, as the Hub reads
them), then the method, the loss and regularizer settings, the data, the run's final metrics
(where its ``metrics.csv`` is found) and the library version.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from treg_lightning import __version__

LIBRARY_NAME = "transformers"  # what loads the folder (AutoModelForCausalLM.from_pretrained)
BASE_TAGS = ("treg-lightning", "preference-optimization")
# The tag of each shipped loss class.
LOSS_TAGS = {"DPOLoss": "dpo", "SimPOLoss": "simpo", "IPOLoss": "ipo"}
# SmolLM2 alias of treg_lightning.models.loading, as its hub id.
ALIAS_HUB_IDS = {"smollm2": "HuggingFaceTB/SmolLM2-135M-Instruct"}


def hub_id(name: str | None) -> str | None:
    """``name`` as a Hub id (``owner/model``), or None for a local file or folder."""
    if not name:
        return None
    name = str(name)
    if name in ALIAS_HUB_IDS:
        return ALIAS_HUB_IDS[name]
    looks_local = name.startswith(("/", ".", "~")) or Path(name).expanduser().exists()
    if looks_local or name.count("/") != 1:
        return None
    return name


def _class_name(setting: Any) -> str | None:
    if isinstance(setting, Mapping):
        path = setting.get("class_path")
        return str(path).rsplit(".", 1)[-1] if path else None
    if setting is None:
        return None
    return type(setting).__name__


def _init_args(setting: Any) -> dict[str, Any]:
    if isinstance(setting, Mapping):
        return dict(setting.get("init_args") or {})
    return {k: v for k, v in vars(setting).items() if not k.startswith("_") and _plain(v)}


def _plain(value: Any) -> bool:
    return isinstance(value, (int, float, str, bool, type(None)))


def final_metrics(metrics_csv: str | Path | None) -> dict[str, float]:
    """The last finite value of each metric in a ``CSVLogger`` ``metrics.csv``; {} without one."""
    if metrics_csv is None or not Path(metrics_csv).is_file():
        return {}
    from treg_lightning.answers.plots import read_metrics

    last = {}
    for key, points in read_metrics(metrics_csv).items():
        finite = [value for _, value in points if math.isfinite(value)]
        if finite:
            last[key] = finite[-1]
    return dict(sorted(last.items()))


def metrics_beside(ckpt_path: str | Path | None) -> Path | None:
    """The ``metrics.csv`` of the run that wrote ``ckpt_path`` (``<log_dir>/checkpoints/x.ckpt``
    -> ``<log_dir>/metrics.csv``), or None."""
    if ckpt_path is None:
        return None
    for folder in Path(ckpt_path).expanduser().resolve().parents[:3]:
        if (folder / "metrics.csv").is_file():
            return folder / "metrics.csv"
    return None


def card_metadata(module, data_source: str | None = None) -> dict[str, Any]:
    """The YAML metadata: ``base_model`` / ``datasets`` where they are Hub ids."""
    hparams = dict(getattr(module, "hparams", {}) or {})
    loss = hparams.get("loss", getattr(module, "loss", None))
    regularizer = hparams.get("regularizer", getattr(module, "regularizer", None))
    tags = list(BASE_TAGS)
    loss_tag = LOSS_TAGS.get(_class_name(loss) or "")
    if loss_tag:
        tags.append(loss_tag)
    if regularizer is not None and float(_init_args(regularizer).get("alpha", 0) or 0) > 0:
        tags.append("treg")
    if getattr(module, "peft", None) is not None:
        tags.append("lora")
    metadata: dict[str, Any] = {"library_name": LIBRARY_NAME, "tags": tags}
    base = hub_id(getattr(module, "model_name", None))
    if base is not None:
        metadata["base_model"] = base
    dataset = hub_id(data_source)
    if dataset is not None:
        metadata["datasets"] = [dataset]
    return metadata


def _settings_lines(title: str, setting: Any) -> list[str]:
    name = _class_name(setting)
    if name is None:
        return [f"- {title}: none"]
    args = _init_args(setting)
    shown = ", ".join(f"`{k}={v}`" for k, v in sorted(args.items()) if _plain(v))
    return [f"- {title}: `{name}`" + (f" ({shown})" if shown else "")]


def model_card(
    module,
    data_source: str | None = None,
    metrics: Mapping[str, float] | None = None,
    adapter_only: bool = False,
) -> str:
    """The text of the card for ``module``'s policy, trained on ``data_source``.

    Args:
        module: the :class:`~treg_lightning.module.PreferenceModule` (its hyperparameters).
        data_source: ``data.source`` of the run ("demo", a file, a hub id).
        metrics: the run's final metrics (:func:`final_metrics`); none: the section says so.
        adapter_only: the folder holds the LoRA adapter alone.
    """
    hparams = dict(getattr(module, "hparams", {}) or {})
    loss = hparams.get("loss", getattr(module, "loss", None))
    regularizer = hparams.get("regularizer", getattr(module, "regularizer", None))
    metadata = card_metadata(module, data_source)
    model_name = getattr(module, "model_name", None)
    lines = [
        "---",
        yaml.safe_dump(metadata, sort_keys=False).rstrip(),
        "---",
        "",
        f"# Policy trained from {model_name} with treg-lightning",
        "",
        "Preference optimization (DPO / IPO / SimPO) with token-level reward regularization "
        "(T-REG), trained with treg-lightning " + __version__ + ".",
        "",
        "## Method",
        "",
        *_settings_lines("Loss", loss),
        *_settings_lines("Regularizer", regularizer),
    ]
    if getattr(module, "peft", None) is not None:
        what = "the adapter alone" if adapter_only else "adapters merged into the base weights"
        lines.append(f"- LoRA: {what}")
    lines += ["", "## Data", "", f"- Training pairs: `{data_source}`", "", "## Final metrics", ""]
    if metrics:
        lines += ["| metric | value |", "|---|---|"]
        lines += [f"| {key} | {value:.6g} |" for key, value in metrics.items()]
    else:
        lines.append("No metrics.csv of the run was found beside the checkpoint.")
    if adapter_only:
        load = [
            "from peft import PeftModel",
            "from transformers import AutoModelForCausalLM",
            f'base = AutoModelForCausalLM.from_pretrained("{model_name}")',
            'model = PeftModel.from_pretrained(base, "<this folder>")',
        ]
    else:
        load = [
            "from transformers import AutoModelForCausalLM",
            'model = AutoModelForCausalLM.from_pretrained("<this folder>")',
        ]
    lines += ["", "## Use", "", "```python", *load, "```"]
    lines += [
        "",
        f"Written by treg-lightning {__version__}.",
        "",
    ]
    return "\n".join(lines)


def plain_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """``trainer.callback_metrics`` (tensors) as sorted finite floats."""
    out = {}
    for key, value in metrics.items():
        try:
            number = float(value)
        except (TypeError, ValueError):
            continue
        if math.isfinite(number):
            out[key] = number
    return dict(sorted(out.items()))


def write_card(folder, module, datamodule, ckpt_path, adapter_only: bool = False) -> Path:
    """The card of ``treg export``: the metrics from the ``metrics.csv`` beside ``ckpt_path``."""
    source = getattr(datamodule, "source", None)
    metrics = final_metrics(metrics_beside(ckpt_path))
    return write_model_card(folder, model_card(module, source, metrics, adapter_only))


def write_model_card(folder: str | Path, text: str) -> Path:
    """Write ``text`` as ``folder/README.md``; returns the path."""
    path = Path(folder) / "README.md"
    path.write_text(text, encoding="utf-8")
    return path


def read_front_matter(path: str | Path) -> dict[str, Any]:
    """The YAML metadata of a card (between its first two ``---`` lines)."""
    text = Path(path).read_text(encoding="utf-8")
    _, front, _ = text.split("---\n", 2)
    return yaml.safe_load(front)
