"""The Hugging Face model card (``README.md``) of an exported policy.

YAML metadata first (``base_model``, ``library_name``, ``tags``, ``datasets``, as the Hub reads
them), then the method (the loss, and the T-REG regularizer with its targets where it is on), the
data the weights were trained on, the metrics of the exported step and the library version.

``treg export`` reads the data and the metrics from the checkpoint it exports
(:mod:`treg_lightning.training.card_metrics`), never from its own config.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from treg_lightning import __version__
from treg_lightning.models.save import CARD_MARK
from treg_lightning.training.card_metrics import (
    StepMetrics,
    checkpoint_record,
    metrics_at_step,
    metrics_beside,
    trained_data,
)

LIBRARY_NAME = "transformers"  # what loads the folder (AutoModelForCausalLM.from_pretrained)
BASE_TAGS = ("treg-lightning", "preference-optimization")
TREG_PAPER = "https://arxiv.org/abs/2412.02685"
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


# ---- the method: loss, regularizer, targets --------------------------------------------------


def treg_on(module) -> bool:
    """Whether the run trains with the T-REG term (a regularizer with ``alpha > 0``)."""
    regularizer = getattr(module, "regularizer", None)
    return regularizer is not None and float(getattr(regularizer, "alpha", 0) or 0) > 0


def _setting(module, name: str) -> tuple[Any, Mapping[str, Any]]:
    """The live object of ``name`` (``loss``, ``regularizer``) and its saved init args."""
    saved = dict(getattr(module, "hparams", {}) or {}).get(name)
    init_args = saved.get("init_args") if isinstance(saved, Mapping) else None
    return getattr(module, name, None), dict(init_args or {})


def _constructor_args(value: Any, saved: Mapping[str, Any]) -> dict[str, Any]:
    """The constructor arguments of ``value``: its attributes of the same names, else the saved
    init args (a user class that keeps them under other names)."""
    try:
        params = list(inspect.signature(type(value).__init__).parameters)[1:]
    except (TypeError, ValueError):
        params = []
    args = {}
    for name in params:
        if hasattr(value, name):
            args[name] = getattr(value, name)
        elif name in saved:
            args[name] = saved[name]
    return args


def _shown(value: Any) -> str:
    if isinstance(value, (int, float, str, bool, type(None))):
        return str(value)
    if isinstance(value, Mapping) and value.get("class_path"):
        return str(value["class_path"]).rsplit(".", 1)[-1]
    return type(value).__name__


def _settings_line(title: str, value: Any, saved: Mapping[str, Any]) -> str:
    args = _constructor_args(value, saved)
    shown = ", ".join(f"`{k}={_shown(v)}`" for k, v in sorted(args.items()))
    return f"- {title}: `{type(value).__name__}`" + (f" ({shown})" if shown else "")


def _summary(value: Any) -> str:
    """The first line of the docstring of ``value``'s class, in Markdown code style."""
    doc = inspect.getdoc(type(value)) or ""
    return doc.splitlines()[0].replace("``", "`") if doc else ""


def method_lines(module) -> list[str]:
    """The loss, and the regularizer with its targets (what they are, the default named as
    such), or that the run trains without T-REG."""
    loss, loss_args = _setting(module, "loss")
    lines = [_settings_line("Loss", loss, loss_args)] if loss is not None else []
    regularizer, reg_args = _setting(module, "regularizer")
    if regularizer is None:
        return [*lines, "- Regularizer: none (no T-REG term)"]
    if not treg_on(module):
        return [*lines, f"- Regularizer: off (`{type(regularizer).__name__}` with `alpha=0`)"]
    lines.append(_settings_line("Regularizer", regularizer, reg_args))
    targets = getattr(regularizer, "targets", None)
    if targets is not None:
        from treg_lightning.losses.targets import SelfGeneratedRewards

        # `targets: null` in the run's config stands for SelfGeneratedRewards.
        default = reg_args.get("targets") is None or type(targets) is SelfGeneratedRewards
        how = " (the default)" if default else ""
        lines.append(f"  - targets: `{type(targets).__name__}`{how}: {_summary(targets)}")
    return lines


def intro(module) -> str:
    """The card's first sentence: T-REG is named only where the run trained with it."""
    loss, _ = _setting(module, "loss")
    name = f"`{type(loss).__name__}`" if loss is not None else "a sequence-level loss"
    if treg_on(module):
        return (
            f"Preference optimization with {name} and token-level reward regularization "
            f"(T-REG, {TREG_PAPER}), trained with treg-lightning {__version__}."
        )
    return (
        f"Preference optimization with {name}, without token-level reward regularization, "
        f"trained with treg-lightning {__version__}."
    )


# ---- the card --------------------------------------------------------------------------------


def card_metadata(module, data_source: str | None = None) -> dict[str, Any]:
    """The YAML metadata: tags from the loss object (its ``card_tag``), the regularizer and
    LoRA; ``base_model`` / ``datasets`` where they are Hub ids."""
    tags = list(BASE_TAGS)
    loss_tag = getattr(getattr(module, "loss", None), "card_tag", None)
    if loss_tag:
        tags.append(str(loss_tag))
    if treg_on(module):
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


def metrics_lines(metrics: StepMetrics | None) -> list[str]:
    """The section of the exported step's metrics: its step, where they were read, a table."""
    if metrics is None or metrics.source is None:
        return ["No metrics.csv of the run was found beside the checkpoint."]
    if metrics.step is None:  # a checkpoint written outside Lightning's loop
        head = "The checkpoint records no global step: each metric's last value in "
        head += str(metrics.source)
    else:
        at = f"global step {metrics.step}"
        if metrics.epoch is not None:
            at += f" (epoch {metrics.epoch})"
        if not metrics.values:
            return [f"{metrics.source} holds no metric logged up to {at}."]
        head = (
            f"The weights of {at}; each metric's last value logged up to that step, "
            f"from {metrics.source}"
        )
    if not metrics.values:
        return [f"{metrics.source} holds no metric values."]
    lines = [
        f"{head}:",
        "",
        "| metric | value | logged at step |",
        "|---|---|---|",
    ]
    for key, (value, step) in metrics.values.items():
        lines.append(f"| {key} | {value:.6g} | {'' if step is None else step} |")
    return lines


def model_card(
    module,
    data_source: str | None = None,
    metrics: StepMetrics | None = None,
    adapter_only: bool = False,
) -> str:
    """The text of the card for ``module``'s policy, trained on ``data_source``.

    Args:
        module: the :class:`~treg_lightning.module.PreferenceModule` of the run (its loss,
            regularizer, LoRA setting and hyperparameters).
        data_source: ``data.source`` the weights were trained on ("demo", a file, a hub id);
            None: not recorded.
        metrics: the metrics of the exported step (:func:`metrics_at_step`,
            :func:`live_metrics`); None: the section says none were found.
        adapter_only: the folder holds the LoRA adapter alone.
    """
    metadata = card_metadata(module, data_source)
    model_name = getattr(module, "model_name", None)
    data = f"`{data_source}`" if data_source is not None else "not recorded in the checkpoint"
    lines = [
        "---",
        yaml.safe_dump(metadata, sort_keys=False).rstrip(),
        "---",
        "",
        f"# Policy trained from {model_name} with treg-lightning",
        "",
        intro(module),
        "",
        "## Method",
        "",
        *method_lines(module),
    ]
    if getattr(module, "peft", None) is not None:
        what = "the adapter alone" if adapter_only else "adapters merged into the base weights"
        lines.append(f"- LoRA: {what}")
    lines += ["", "## Data", "", f"- Training pairs: {data}", ""]
    lines += ["## Metrics at the exported step", "", *metrics_lines(metrics)]
    lines += ["", "## Use", "", "```python", *_load_lines(model_name, adapter_only), "```"]
    lines += ["", f"{CARD_MARK} {__version__}.", ""]
    return "\n".join(lines)


def _load_lines(model_name: str | None, adapter_only: bool) -> list[str]:
    if adapter_only:
        return [
            "from peft import PeftModel",
            "from transformers import AutoModelForCausalLM",
            f'base = AutoModelForCausalLM.from_pretrained("{model_name}")',
            'model = PeftModel.from_pretrained(base, "<this folder>")',
        ]
    return [
        "from transformers import AutoModelForCausalLM",
        'model = AutoModelForCausalLM.from_pretrained("<this folder>")',
    ]


def write_card(folder, module, ckpt_path, adapter_only: bool = False) -> Path:
    """The card of ``treg export``: the data and the metrics of the checkpoint's own run and step
    (:func:`checkpoint_record`, :func:`metrics_at_step`), never the export's config."""
    record = checkpoint_record(ckpt_path)
    metrics = metrics_at_step(metrics_beside(ckpt_path), record)
    card = model_card(module, trained_data(record), metrics, adapter_only)
    return write_model_card(folder, card)


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
