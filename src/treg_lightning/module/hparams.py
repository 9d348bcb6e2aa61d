"""Hyperparameters that reload without the CLI: injected objects described as class paths.

Under the CLI, Lightning saves the parsed config (plain values). Outside it, the injected
objects of :class:`~treg_lightning.module.PreferenceModule` (the loss, the regularizer and its
targets, optimizer / scheduler partials) are stored as ``{"class_path", "init_args"}`` and
instantiated back by jsonargparse on ``load_from_checkpoint``; an object that cannot be described
(init arguments that are neither plain values nor describable objects) is left out: pass it
again when loading.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import inspect
from typing import Any

import lightning as L
from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters
from torch import nn

_PLAIN = (int, float, str, bool, type(None))


def portable_hparams(module: L.LightningModule, init_args: dict[str, Any]) -> None:
    """``module.save_hyperparameters()`` of the caller's ``__init__`` arguments, with injected
    objects described (see the module docstring)."""
    args = {k: v for k, v in init_args.items() if k not in ("self", "__class__")}
    under_cli = _given_hyperparameters.get() is not None
    injected = {} if under_cli else {k: v for k, v in args.items() if _is_object(v)}
    frame = inspect.currentframe().f_back  # the caller: the module's __init__
    module.save_hyperparameters(ignore=list(injected), frame=frame)
    if not injected:
        return
    described = {k: _describe(v) for k, v in injected.items()}
    module.hparams.update({k: v for k, v in described.items() if v is not None})
    module.hparams["_instantiator"] = "lightning.pytorch.cli.instantiate_module"


def _is_object(value: Any) -> bool:
    is_config = dataclasses.is_dataclass(value) and not isinstance(value, type)  # peft.LoraConfig
    return isinstance(value, nn.Module) or callable(value) or is_config


def _describe(value: Any) -> dict[str, Any] | None:
    """``{"class_path", "init_args"}`` for a ``partial(cls, **kwargs)``, a class, or an object
    whose constructor arguments are attributes holding plain values or describable objects
    (recursively: a regularizer and its targets); else None."""
    if isinstance(value, functools.partial) and isinstance(value.func, type) and not value.args:
        return {"class_path": _class_path(value.func), "init_args": dict(value.keywords)}
    if isinstance(value, type):
        return {"class_path": _class_path(value)}
    if inspect.isroutine(value) or not hasattr(value, "__dict__"):
        return None  # a function, lambda or builtin: nothing to rebuild it from
    if dataclasses.is_dataclass(value):
        return _describe_dataclass(value)
    cls = real_class(value)
    if cls.__init__ is object.__init__:
        return {"class_path": _class_path(cls)}
    params = list(inspect.signature(cls.__init__).parameters)[1:]
    init_args = {}
    for name in params:
        if not hasattr(value, name):
            continue
        arg = getattr(value, name)
        if not isinstance(arg, _PLAIN):
            arg = _describe(arg) if _is_object(arg) else None
            if arg is None:
                return None
        init_args[name] = arg
    return {"class_path": _class_path(cls), "init_args": init_args}


def _describe_dataclass(value: Any) -> dict[str, Any] | None:
    """A config dataclass (``peft.LoraConfig``) by the fields that differ from its defaults."""
    cls = type(value)
    try:
        default = cls()
    except (TypeError, ValueError):  # required fields, or defaults its checks refuse
        default = None
    init_args = {}
    for item in dataclasses.fields(value):
        current = getattr(value, item.name)
        if not item.init or (default is not None and current == getattr(default, item.name)):
            continue
        plain = _plain(current)
        if plain is _UNDESCRIBABLE:
            return None
        init_args[item.name] = plain
    return {"class_path": _class_path(cls), "init_args": init_args}


_UNDESCRIBABLE = object()


def _plain(value: Any) -> Any:
    """``value`` as plain values (a set as a sorted list, an enum as its value)."""
    if isinstance(value, enum.Enum):
        value = value.value
    if isinstance(value, _PLAIN):
        return value
    if isinstance(value, (set, frozenset)):
        value = sorted(value, key=str)
    if isinstance(value, (list, tuple)):
        items = [_plain(v) for v in value]
        return _UNDESCRIBABLE if _UNDESCRIBABLE in items else items
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        items = {k: _plain(v) for k, v in value.items()}
        return _UNDESCRIBABLE if _UNDESCRIBABLE in items.values() else items
    return _UNDESCRIBABLE


def real_class(value: Any) -> type:
    """The class of ``value``; for a jsonargparse ``lazy_instance`` (a subclass made on the fly),
    the class it stands for, which its public ``lazy_get_init_data()`` names."""
    describe = getattr(value, "lazy_get_init_data", None)
    if not callable(describe):
        return type(value)
    name = describe().class_path.rsplit(".", 1)[-1]
    return next(cls for cls in type(value).__mro__[1:] if cls.__name__ == name)


def _class_path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"
