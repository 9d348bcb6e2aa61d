"""The start-up check of a model argument: it exists, is of the kind the command needs, and
shares the vocabulary of the tokenizer it will be fed. No weights are read.

Commands name many models: the policy (``model.model``), its reference, a token-reward source's
evaluator or positive / negative model, a pair scorer's reward model or reference. A wrong one
used to show only after the expensive stage (an ``OSError`` after every answer was sampled, an
``IndexError`` inside an embedding lookup), or never (a reward model loaded as a causal LM under a
random head). :func:`check_model` reads ``config.json`` (or ``adapter_config.json``, or a GGUF
file's header) and the tokenizer files, in seconds, and says in one paragraph what is wrong,
naming the setting::

    check_model(name, "data.rewards.positive", tokenizer=data_tokenizer)       # a causal LM
    check_model(name, "scorer.name_or_path", expected=SEQUENCE_CLASSIFIER)    # a reward model
    model_location(a) == model_location(b)                                    # one model twice?
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

from transformers import AutoConfig, AutoTokenizer

from treg_lightning.errors import ConfigError, MissingFileError
from treg_lightning.models.kinds import (
    CAUSAL_LM,
    SEQUENCE_CLASSIFIER,
    UNKNOWN,
    adapter_folder_error,
    architecture,
    config_kind,
    is_adapter_folder,
    wrong_kind_error,
)
from treg_lightning.models.loading import (
    SMOLLM2_ALIAS,
    SMOLLM2_FOLDER,
    cache_root,
    find_smollm2_gguf,
)

__all__ = [
    "CAUSAL_LM",
    "SEQUENCE_CLASSIFIER",
    "ModelFacts",
    "check_model",
    "check_vocabulary",
    "inspect_model",
    "model_location",
    "require_kind",
]

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


@dataclass(frozen=True)
class ModelFacts:
    """What :func:`inspect_model` read of a model argument.

    Attributes:
        name: the argument as given.
        location: where it is read from: the absolute path of a local folder or ``.gguf``
            file, or the hub id (:func:`model_location`).
        kind: ``CAUSAL_LM``, ``SEQUENCE_CLASSIFIER``, ``OTHER`` or ``UNKNOWN``
            (:mod:`treg_lightning.models.kinds`).
        architecture: the class its config names (None: none named).
        vocab_size: rows of its embedding table, per its config (None: not stated).
        num_labels: the outputs of a sequence classifier (None for other kinds).
        gguf_file: the file's name when ``location`` is a ``.gguf`` file, else None.
    """

    name: str
    location: str
    kind: str
    architecture: str | None
    vocab_size: int | None
    num_labels: int | None = None
    gguf_file: str | None = None


def _looks_local(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~")) or name.endswith(".gguf")


def model_location(name: str | os.PathLike) -> str:
    """Where ``name`` is read from, one spelling per model: the absolute real path of a local
    folder or file (relative, ``~`` and symlinked spellings alike), the converted folder of the
    ``"smollm2"`` alias, or a hub id as given."""
    name = str(name)
    if name == SMOLLM2_ALIAS:
        return str((cache_root() / "models" / SMOLLM2_FOLDER).resolve())
    path = Path(name).expanduser()
    if path.exists() or _looks_local(name):
        return str(path.resolve())
    return name


def inspect_model(
    name: str | os.PathLike,
    setting: str,
    trust_remote_code: bool = False,
    safetensors_only: bool = True,
) -> ModelFacts:
    """Read what ``name`` is from its config, without its weights.

    Args:
        name: hub id, local folder, ``.gguf`` file or ``"smollm2"``.
        setting: the setting that names it (in the messages), e.g. ``"data.rewards.positive"``.
        trust_remote_code: allow reading a config whose class is remote code.
        safetensors_only: the loader reads safetensors only (the causal-LM loader does), so a
            local folder with ``.bin`` weights alone is refused now rather than at loading.

    Raises:
        MissingFileError: no such folder, file or hub model; a folder without config.json or
            without weights.
        ConfigError: an adapter folder (named as such), or a config that cannot be read.
    """
    name = str(name)
    if name == SMOLLM2_ALIAS:
        folder = cache_root() / "models" / SMOLLM2_FOLDER
        if (folder / "config.json").is_file():
            return _folder(name, folder, setting, trust_remote_code, safetensors_only)
        try:
            shipped = find_smollm2_gguf()
        except (ImportError, FileNotFoundError) as err:
            raise ConfigError(f"{setting} {name!r}: {err}") from err
        return _gguf(name, shipped, setting)
    path = Path(name).expanduser()
    if name.endswith(".gguf"):
        if not path.is_file():
            raise MissingFileError(
                f"{setting}: the GGUF file {path} does not exist; check the path (or give a "
                "save_pretrained folder, a hub id or 'smollm2')."
            )
        return _gguf(name, path, setting)
    if path.is_dir():
        return _folder(name, path, setting, trust_remote_code, safetensors_only)
    if path.is_file():
        raise MissingFileError(
            f"{setting}: {path} is a file, not a model folder: give the folder that holds "
            "config.json and the weights (written by save_pretrained), a .gguf file, a hub id or "
            "'smollm2'."
        )
    if _looks_local(name):
        raise MissingFileError(
            f"{setting}: the model path {path} does not exist. Give a save_pretrained folder, a "
            ".gguf file, a Hugging Face hub id or 'smollm2'."
        )
    return _hub(name, setting, trust_remote_code)


def _folder(
    name: str,
    path: Path,
    setting: str,
    trust_remote_code: bool = False,
    safetensors_only: bool = True,
) -> ModelFacts:
    if is_adapter_folder(path):
        raise adapter_folder_error(path, setting, name)
    if not (path / "config.json").is_file():
        held = sorted(p.name for p in path.iterdir())
        shown = ", ".join(held[:5]) + (", ..." if len(held) > 5 else "") if held else "nothing"
        raise MissingFileError(
            f"{setting}: {path} is a folder but holds no config.json (it holds {shown}), so it "
            "is no model written by save_pretrained. Point it at such a folder, a .gguf file, a "
            "hub id or 'smollm2'."
        )
    if not any(path.glob("*.safetensors")):
        pickled = sorted(p.name for p in path.glob("*.bin"))
        if not pickled:
            raise MissingFileError(
                f"{setting}: {path} holds config.json but no weights (no *.safetensors file): a "
                "config or tokenizer folder, not a model. Point it at the folder the model was "
                "saved to."
            )
        if safetensors_only:
            raise MissingFileError(
                f"{setting}: {path} holds no safetensors weights, only {', '.join(pickled[:3])}; "
                "only safetensors are loaded (pickle-based .bin files can run code). If you "
                "trust its source, load it once and re-save it with "
                "model.save_pretrained(folder) (safetensors)."
            )
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise ConfigError(
            f"{setting}: {path / 'config.json'} cannot be read as a model config: "
            f"{_first_line(err)}"
        ) from err
    return _facts(name, str(path.resolve()), config)


def _gguf(name: str, path: Path, setting: str) -> ModelFacts:
    if importlib.util.find_spec("gguf") is None:
        raise ConfigError(
            f"{setting}: reading {path} needs the `gguf` package: pip install gguf "
            "(treg-lightning's `demo` extra includes it)."
        )
    try:
        config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    except (OSError, ValueError, KeyError) as err:
        raise ConfigError(
            f"{setting}: {path} cannot be read as a GGUF model: {_first_line(err)}"
        ) from err
    return _facts(name, str(path.resolve()), config, gguf_file=path.name)


def _hub(name: str, setting: str, trust_remote_code: bool = False) -> ModelFacts:
    try:
        config = AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        adapter = _hub_adapter_config(name)
        if adapter is not None:
            raise adapter_folder_error(adapter.parent, setting, name) from err
        raise MissingFileError(
            f"{setting} {name!r}: no local folder or file of that name, and no model on the "
            f"Hugging Face hub could be read ({_first_line(err)}). Check the name (a hub id is "
            "org/name; a local path starts with ./ or /), or, offline, download it first "
            "(hf download <id>) or give its local folder."
        ) from err
    return _facts(name, name, config)


def _hub_adapter_config(name: str) -> Path | None:
    """The cached ``adapter_config.json`` of hub repo ``name``, if it holds one."""
    from transformers.utils.peft_utils import find_adapter_config_file

    try:
        found = find_adapter_config_file(name)
    except (OSError, ValueError):  # a name the hub client refuses (e.g. "a/b/c")
        return None
    return Path(found) if found else None


def _facts(name: str, location: str, config, gguf_file: str | None = None) -> ModelFacts:
    kind = config_kind(config)
    vocab = getattr(config, "vocab_size", None)
    if vocab is None and hasattr(config, "get_text_config"):  # multimodal: the text model's
        vocab = getattr(config.get_text_config(), "vocab_size", None)
    return ModelFacts(
        name=name,
        location=location,
        kind=kind,
        architecture=architecture(config),
        vocab_size=vocab if isinstance(vocab, int) else None,
        num_labels=getattr(config, "num_labels", None) if kind == SEQUENCE_CLASSIFIER else None,
        gguf_file=gguf_file,
    )


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def require_kind(facts: ModelFacts, expected: str, setting: str) -> None:
    """Refuse a model of another kind than ``expected`` (``CAUSAL_LM`` or
    ``SEQUENCE_CLASSIFIER``); a model whose kind cannot be told (remote code) passes."""
    if facts.kind in (expected, UNKNOWN):
        return
    where = f"{setting} {facts.name!r}"
    raise wrong_kind_error(where, facts.kind, facts.architecture, expected, facts.num_labels)


def vocabulary_difference(ours: dict, theirs: dict, shown: int) -> list:
    """Up to ``shown`` of the ``(token, id)`` entries only one of two vocabularies holds (in a
    stable order); empty when both map every token to the same id."""
    if ours == theirs:
        return []
    return sorted(set(ours.items()) ^ set(theirs.items()), key=str)[:shown]


def check_vocabulary(
    facts: ModelFacts,
    tokenizer,
    setting: str,
    fed: str = "the data tokenizer",
    trust_remote_code: bool = False,
) -> None:
    """Refuse a model that does not read the ids ``tokenizer`` writes: ids past its embedding
    table (per its config), or its own tokenizer mapping tokens to other ids.

    Args:
        facts: the model, from :func:`inspect_model`.
        tokenizer: the tokenizer whose ids it will be fed.
        setting: the setting that names the model.
        fed: what ``tokenizer`` is, in the message (e.g. "the policy's tokenizer").
        trust_remote_code: allow loading the model's tokenizer code from the hub.
    """
    size = len(tokenizer)
    tokenizer_name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
    where = f"{setting} {facts.name!r}"
    if facts.vocab_size is not None and size > facts.vocab_size:
        raise ConfigError(
            f"{where} embeds {facts.vocab_size} tokens, but {fed} ({tokenizer_name!r}) has "
            f"{size}: its ids would reach past the model's embedding table. Give a model of the "
            "tokenizer's family (one that shares its vocabulary)."
        )
    if model_location(tokenizer_name) == facts.location:
        return  # the model's own tokenizer
    own = _own_tokenizer(facts, trust_remote_code)
    if own is None:
        return  # no tokenizer of its own to compare with: the size check above is all
    ours, theirs = tokenizer.get_vocab(), own.get_vocab()
    diff = vocabulary_difference(ours, theirs, 4)
    if diff:
        raise ConfigError(
            f"{where}: its tokenizer differs from {fed} ({tokenizer_name!r}): {len(theirs)} vs "
            f"{len(ours)} tokens, e.g. {diff}; the ids it would be fed mean other tokens to it. "
            "Give a model of the same family (the same vocabulary)."
        )


def _own_tokenizer(facts: ModelFacts, trust_remote_code: bool = False):
    """The tokenizer saved with the model, or None when it has none."""
    location = Path(facts.location)
    if facts.gguf_file is not None:
        return AutoTokenizer.from_pretrained(location.parent, gguf_file=facts.gguf_file)
    if location.is_dir():
        if not any((location / name).is_file() for name in TOKENIZER_FILES):
            return None
        return AutoTokenizer.from_pretrained(location, trust_remote_code=trust_remote_code)
    try:  # a hub model: its tokenizer files, if it has any
        return AutoTokenizer.from_pretrained(facts.location, trust_remote_code=trust_remote_code)
    except (OSError, ValueError):
        return None


def check_model(
    name: str | os.PathLike,
    setting: str,
    *,
    expected: str = CAUSAL_LM,
    tokenizer=None,
    fed: str = "the data tokenizer",
    trust_remote_code: bool = False,
    safetensors_only: bool = True,
) -> ModelFacts:
    """The whole start-up check of one model argument: :func:`inspect_model` (existence, an
    adapter folder named as such), :func:`require_kind`, and with ``tokenizer``
    :func:`check_vocabulary`.

    Args:
        name: hub id, local folder, ``.gguf`` file or ``"smollm2"``.
        setting: the setting that names it, e.g. ``"data.rewards.positive"``.
        expected: ``CAUSAL_LM`` or ``SEQUENCE_CLASSIFIER``.
        tokenizer: the tokenizer whose ids it will read (None: it tokenizes text itself).
        fed: what ``tokenizer`` is, in the messages.
        trust_remote_code: allow remote config / tokenizer code.
        safetensors_only: the loader reads safetensors only.

    Returns:
        What was read (:class:`ModelFacts`).
    """
    facts = inspect_model(name, setting, trust_remote_code, safetensors_only)
    require_kind(facts, expected, setting)
    if tokenizer is not None:
        check_vocabulary(facts, tokenizer, setting, fed, trust_remote_code)
    return facts
