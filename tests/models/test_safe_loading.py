"""Safe loading: nothing a checkpoint, model folder or cache holds can run code on load.

Source scans (ast, over every module of src/treg_lightning): every ``torch.load`` passes
``weights_only=True``; no pickle-family module is imported; every ``trust_remote_code`` argument
defaults to False and no call passes True. Behaviour: a model folder holding only a pickle
``pytorch_model.bin`` (one that would run code when unpickled) is refused, and the code never
runs; nor does the custom code of a folder whose config asks for it.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import torch

SRC = Path(__file__).resolve().parents[2] / "src" / "treg_lightning"
PICKLE_MODULES = {"pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal", "_pickle"}


def modules() -> list[tuple[Path, ast.Module]]:
    files = sorted(SRC.rglob("*.py"))
    assert len(files) > 20  # the scan sees the package
    return [(path, ast.parse(path.read_text(), str(path))) for path in files]


def _is_torch_load(call: ast.Call) -> bool:
    func = call.func
    return (
        isinstance(func, ast.Attribute)
        and func.attr == "load"
        and (isinstance(func.value, ast.Name) and func.value.id == "torch")
    )


def test_every_torch_load_is_weights_only():
    calls = []
    for path, tree in modules():
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and _is_torch_load(node):
                kwargs = {k.arg: k.value for k in node.keywords}
                value = kwargs.get("weights_only")
                ok = isinstance(value, ast.Constant) and value.value is True
                calls.append((path.name, node.lineno, ok))
    assert calls, "no torch.load found: the scan is broken"
    assert [c for c in calls if not c[2]] == []


def test_no_pickle_family_module_is_imported():
    found = []
    for path, tree in modules():
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name.split(".")[0] for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [(node.module or "").split(".")[0]]
            else:
                continue
            found += [(path.name, node.lineno, n) for n in names if n in PICKLE_MODULES]
    assert found == []


def test_trust_remote_code_defaults_false_and_is_never_forced_on():
    signatures, forced = [], []
    for path, tree in modules():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                args = node.args.args + node.args.kwonlyargs
                defaults = [None] * (len(node.args.args) - len(node.args.defaults))
                defaults += node.args.defaults + node.args.kw_defaults
                for arg, default in zip(args, defaults, strict=True):
                    if arg.arg == "trust_remote_code":
                        ok = isinstance(default, ast.Constant) and default.value is False
                        signatures.append((path.name, node.name, ok))
            if isinstance(node, ast.Call):
                for keyword in node.keywords:
                    value = keyword.value
                    if keyword.arg == "trust_remote_code" and (
                        isinstance(value, ast.Constant) and value.value is True
                    ):
                        forced.append((path.name, node.lineno))
    names = {(file, name) for file, name, _ in signatures}
    # The public entry points that load models or tokenizers all take it.
    assert {
        ("loading.py", "load_tokenizer"),
        ("loading.py", "load_causal_lm"),
        ("preference.py", "__init__"),
        ("datamodule.py", "__init__"),
    } <= names
    assert [s for s in signatures if not s[2]] == []
    assert forced == []


class _RunsCode:
    """Unpickling this object calls ``Path(marker).touch()``: what a hostile .bin can do."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_pickle_weights_are_refused_and_never_unpickled(tiny_model_dir, tmp_path):
    from transformers import AutoConfig

    from treg_lightning.models.loading import load_causal_lm

    folder = tmp_path / "bin-only"
    AutoConfig.from_pretrained(tiny_model_dir).save_pretrained(folder)
    marker = tmp_path / "code-ran"
    torch.save({"payload": _RunsCode(str(marker))}, folder / "pytorch_model.bin")
    with pytest.raises(OSError) as info:
        load_causal_lm(folder)
    assert str(info.value).startswith(f"{folder} holds no safetensors weights; only safetensors")
    assert not marker.exists()


def test_remote_code_in_a_model_folder_is_not_run(tiny_model_dir, tmp_path):
    """A folder whose config maps to its own code (auto_map) loads with the built-in class of
    its model_type (transformers 5 refuses remote code unless trusted); the code never runs."""
    import shutil

    from treg_lightning.models.loading import load_causal_lm, load_tokenizer

    folder = tmp_path / "custom-code"
    shutil.copytree(tiny_model_dir, folder)
    marker = tmp_path / "code-ran"
    (folder / "evil.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).touch()\n"
        "from transformers import LlamaConfig as EvilConfig, LlamaForCausalLM as EvilModel\n"
    )
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {
        "AutoConfig": "evil.EvilConfig",
        "AutoModelForCausalLM": "evil.EvilModel",
    }
    (folder / "config.json").write_text(json.dumps(config))
    try:
        model = load_causal_lm(folder)
    except ValueError as err:  # older transformers: refuses outright
        assert "trust_remote_code" in str(err)
    else:
        assert type(model).__module__.startswith("transformers.models.llama")
    load_tokenizer(folder)
    assert not marker.exists()
