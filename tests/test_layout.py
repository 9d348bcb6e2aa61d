"""The package's layout holds: every package imports only the packages below it in the stated
order (counting imports inside functions; no cycle), no private name crosses a package line, the
losses load no PEFT glue, the root stays small, the forward pass lives in ``forward/``,
checkpoints are read in one place, and no import hook keeps older module names alive (older
class paths are rewritten where checkpoints are read: tests/models/test_renames.py)."""

from __future__ import annotations

import ast
import importlib
import inspect
import subprocess
import sys
from pathlib import Path

import pytest

import treg_lightning
from treg_lightning.models.renames import MOVED_MODULES

SRC = Path(treg_lightning.__file__).parent
PKG = "treg_lightning"


def _module_files() -> dict[str, Path]:
    files = {}
    for path in SRC.rglob("*.py"):
        parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        files[".".join(parts)] = path
    return files


FILES = _module_files()


def _owner(name: str) -> str:
    """The module of the package that ``name`` (a module or an object in one) belongs to."""
    while name not in FILES and "." in name:
        name = name.rsplit(".", 1)[0]
    return name


def _imports(module: str, path: Path) -> set[str]:
    """Modules of the package that ``module`` imports anywhere in its file."""
    found = set()
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {_owner(a.name) for a in node.names if a.name.startswith(PKG + ".")}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
                base = f"{base}.{node.module}" if node.module else base
            if base == PKG or base.startswith(PKG + "."):
                found |= {_owner(f"{base}.{a.name}") for a in node.names}
    found.discard(module)
    found.discard(PKG)  # the package face: its version number only
    return found


GRAPH = {module: _imports(module, path) for module, path in FILES.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a path, or None (depth-first search with colours)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_graph_sees_function_level_imports():
    # models.checkpoints imports the adapters inside a function only
    assert "treg_lightning.models.adapters" in GRAPH["treg_lightning.models.checkpoints"]
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_no_import_cycle_between_modules():
    assert _cycle(GRAPH) is None


def _package(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2])


def test_no_import_cycle_between_packages():
    assert _cycle(_package_graph()) is None


# The stated order, top to bottom (README "Layout", the package docstring): a package imports
# only packages after it. Groups of one layer are listed together: training -> answers,
# module -> data -> rewards, forward -> models, passes -> outputs -> pairs -> errors.
ORDER = (
    "cli",
    *("training", "answers", "plan"),
    *("module", "data", "rewards"),
    *("forward", "models", "metrics"),
    "losses",
    *("passes", "outputs", "pairs", "errors"),
)


def _package_graph() -> dict[str, set[str]]:
    packages: dict[str, set[str]] = {}
    for module, deps in GRAPH.items():
        own = _package(module)
        packages.setdefault(own, set()).update(_package(d) for d in deps if _package(d) != own)
    packages.pop(PKG, None)  # the package face imports nothing of the package
    return packages


def test_every_package_has_a_place_in_the_order():
    packages = {p.removeprefix(PKG + ".") for p in _package_graph()}
    assert packages <= set(ORDER), f"not in the stated order: {sorted(packages - set(ORDER))}"
    assert {"cli", "training", "module", "models", "losses", "errors"} <= packages


def _upward(graph: dict[str, set[str]], package: str) -> list[str]:
    """``module -> import`` of each import of ``package``'s modules that does not go below it."""
    below = {f"{PKG}.{p}" for p in ORDER[ORDER.index(package) + 1 :]}
    return sorted(
        f"{module} -> {dep}"
        for module, deps in graph.items()
        if _package(module) == f"{PKG}.{package}"
        for dep in deps
        if _package(dep) != _package(module) and _package(dep) not in below
    )


@pytest.mark.parametrize(
    "package", [p for p in ORDER if (SRC / p).is_dir() or (SRC / f"{p}.py").is_file()]
)
def test_each_package_imports_only_what_is_below_it(package):
    assert not _upward(GRAPH, package), f"{package} imports packages at or above it"


def test_an_upward_import_is_caught():
    graph = {
        f"{PKG}.module.preference": {f"{PKG}.training.checks", f"{PKG}.module.checks"},
        f"{PKG}.module.checks": {f"{PKG}.rewards.source", f"{PKG}.errors"},
    }
    assert _upward(graph, "module") == [f"{PKG}.module.preference -> {PKG}.training.checks"]


def _private_members_by_package() -> dict[str, set[str]]:
    """``{_name: packages}`` of the private methods and ``self`` attributes of each package's
    classes (a dependency's private attribute set on a foreign object,
    ``config._attn_implementation = ...``, or a module-level function is no member)."""
    defined: dict[str, set[str]] = {}
    for module, path in FILES.items():
        for cls in ast.walk(ast.parse(path.read_text())):
            if not isinstance(cls, ast.ClassDef):
                continue
            names = [
                n.name for n in cls.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
            ]
            for node in ast.walk(cls):
                targets = node.targets if isinstance(node, ast.Assign) else []
                targets += [node.target] if isinstance(node, ast.AnnAssign) else []
                names += [
                    t.attr
                    for t in targets
                    if isinstance(t, ast.Attribute) and ast.unparse(t.value) == "self"
                ]
            for name in names:
                if name.startswith("_") and not name.startswith("__"):
                    defined.setdefault(name, set()).add(_package(module))
    return defined


def _private_crossings(files: dict[str, Path]) -> list[str]:
    """Each use in ``files`` of a private name that only another package defines: imported
    (``from treg_lightning.data.sources import _decode``) or reached as an attribute
    (``datamodule._serve(...)``)."""
    members = _private_members_by_package()
    found = []
    for module, path in files.items():
        own = _package(module)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(PKG + "."):
                for alias in node.names:
                    if alias.name.startswith("_") and _package(node.module) != own:
                        found.append(f"{module}:{node.lineno} imports {node.module}.{alias.name}")
            elif isinstance(node, ast.Attribute) and node.attr.startswith("_"):
                homes = members.get(node.attr, set())
                if homes and own not in homes:
                    found.append(f"{module}:{node.lineno} uses {ast.unparse(node)}")
    return found


def test_no_private_name_crosses_a_package_line():
    assert _private_crossings(FILES) == []


def test_a_private_crossing_is_caught(tmp_path):
    path = tmp_path / "reader.py"
    path.write_text(
        "from treg_lightning.data.sources import _decode\n"
        "def f(datamodule):\n    return datamodule._device(), datamodule.get_tokenizer()\n"
    )
    assert _private_crossings({f"{PKG}.answers.reader": path}) == [
        f"{PKG}.answers.reader:1 imports {PKG}.data.sources._decode",
        f"{PKG}.answers.reader:3 uses datamodule._device",
    ]


# Modules that import nothing heavy: imported at the top of a file, never inside a function
# (a function-level import hides a dependency and saves nothing).
GROUND_FLOOR = tuple(f"{PKG}.{name}" for name in ("errors", "pairs", "outputs", "passes"))


def _function_level_imports(path: Path) -> list[tuple[int, str]]:
    """``(line, module)`` of each import of the package made inside a function of ``path``."""
    found = []
    for function in ast.walk(ast.parse(path.read_text())):
        if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for node in ast.walk(function):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(PKG):
                found.append((node.lineno, node.module))
            elif isinstance(node, ast.Import):
                found += [(node.lineno, a.name) for a in node.names if a.name.startswith(PKG)]
    return sorted(set(found))


def _lazy_ground_floor(files: dict[str, Path]) -> list[str]:
    return [
        f"{module}:{line} imports {name}"
        for module, path in sorted(files.items())
        for line, name in _function_level_imports(path)
        if name.startswith(GROUND_FLOOR)
    ]


def test_no_ground_floor_module_is_imported_inside_a_function():
    assert _lazy_ground_floor(FILES) == []


def test_a_function_level_import_is_seen(tmp_path):
    path = tmp_path / "m.py"
    path.write_text(
        "from treg_lightning.pairs import SIDES\n"
        "def f():\n    from treg_lightning.errors import ConfigError\n    return ConfigError\n"
    )
    assert _lazy_ground_floor({f"{PKG}.answers.m": path}) == [
        f"{PKG}.answers.m:3 imports {PKG}.errors"
    ]


def test_pairs_imports_only_torch_and_errors():
    assert GRAPH["treg_lightning.pairs"] <= {"treg_lightning.errors"}


def test_passes_sit_on_the_ground_floor():
    """The pass machinery imports only errors (and itself) of the package, and of the rest of
    the world only the standard library and torch.distributed."""
    for module, deps in GRAPH.items():
        if module.startswith("treg_lightning.passes"):
            assert {d for d in deps if not d.startswith("treg_lightning.passes")} <= {
                "treg_lightning.errors"
            }, module
            tree = ast.parse(FILES[module].read_text())
            roots = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
            roots |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
            outside = {r for r in roots if r.split(".")[0] not in sys.stdlib_module_names}
            assert outside <= {"torch.distributed"} | {r for r in roots if r.startswith(PKG)}, (
                module, outside)  # fmt: skip


def test_one_rank_rule_and_one_atomic_rename():
    """The rank rule (``% world_size`` / ``range(rank, n, world_size)``) and the rename of a
    finished temporary file (``os.replace`` / ``Path.replace`` / ``os.rename``) each live in
    one place, treg_lightning.passes; every pass and writer goes through it."""
    rules, renames = [], []
    for path in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            text = ast.unparse(node) if isinstance(node, (ast.BinOp, ast.Call)) else ""
            where = path.relative_to(SRC).as_posix()
            if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mod):
                if ast.unparse(node.right).endswith("world_size"):  # k % world_size
                    rules.append(where)
            if isinstance(node, ast.Call) and text.startswith("range(") and "world_size" in text:
                rules.append(where)
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                if node.func.attr in ("replace", "rename") and _renames(node):
                    renames.append(where)
    assert rules == ["passes/shards.py"]
    # models/save.py swaps a whole export folder for an earlier one (kept until the swap).
    assert sorted(set(renames)) == ["models/save.py", "passes/atomic.py"], sorted(renames)


def _renames(call: ast.Call) -> bool:
    """``os.replace(a, b)``, ``os.rename(a, b)`` or ``path.replace(b)`` (not ``str.replace``)."""
    func = call.func
    if isinstance(func.value, ast.Name) and func.value.id == "os":
        return True
    return func.attr == "replace" and len(call.args) == 1 and not call.keywords


def test_losses_load_neither_peft_nor_the_lora_module():
    code = (
        "import sys, treg_lightning.losses; "
        "print('peft' in sys.modules, 'treg_lightning.models.lora' in sys.modules, "
        "'jsonargparse' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False", "False"]


def test_root_holds_at_most_six_modules():
    root = sorted(p.name for p in SRC.glob("*.py"))
    assert len(root) <= 6, root


def test_no_attention_mask_or_varlen_code_under_data():
    words = ("cu_seqlens", "BlockMask", "create_block_mask", "flash_attn", "max_seqlen")
    for path in (SRC / "data").rglob("*.py"):
        text = path.read_text()
        assert not [w for w in words if w in text], path


def test_one_torch_load_call_site():
    sites = []
    for path in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and ast.unparse(node.func) == "torch.load":
                sites.append(path.relative_to(SRC).as_posix())
    assert sites == ["models/checkpoints.py"]


def test_the_wrapper_prefix_is_one_constant():
    holders = [
        p.relative_to(SRC).as_posix()
        for p in SRC.rglob("*.py")
        if '"_checkpoint_wrapped_module."' in p.read_text()
    ]
    assert holders == ["models/state_names.py"]


def test_no_import_hook_for_older_module_names():
    """Older module names do not import (configs get a hint instead, checkpoints a rewrite);
    the package installs no finder on the import system."""
    assert not [f for f in sys.meta_path if type(f).__module__.startswith(PKG)]
    assert "MetaPathFinder" not in (SRC / "__init__.py").read_text()
    for old in ("schedulers", "adapters", "training.schedulers", "data.packing"):
        with pytest.raises(ModuleNotFoundError):
            importlib.import_module(f"{PKG}.{old}")


@pytest.mark.parametrize("old", sorted(MOVED_MODULES))
def test_each_renamed_module_exists_under_its_new_name_only(old):
    assert f"{PKG}.{old}" not in FILES  # else the rewrite would shadow a live module
    assert f"{PKG}.{MOVED_MODULES[old]}" in FILES


def test_verbs_keep_lightnings_signatures():
    """``TRegTrainer.predict`` takes Lightning's arguments in Lightning's order (its own settings
    are keyword-only), Lightning's own verbs are untouched, and ``plan`` is a classmethod (it
    runs without a trainer)."""
    from lightning.pytorch import Trainer

    from treg_lightning.training.trainer import TRegTrainer

    ours = inspect.signature(TRegTrainer.predict).parameters
    theirs = list(inspect.signature(Trainer.predict).parameters)
    positional = [n for n, p in ours.items() if p.kind is p.POSITIONAL_OR_KEYWORD]
    assert positional == theirs
    for verb in ("fit", "validate", "test"):
        assert getattr(TRegTrainer, verb) is getattr(Trainer, verb)
    assert isinstance(inspect.getattr_static(TRegTrainer, "plan"), classmethod)


def test_predict_with_dataloaders_runs_lightnings_loop():
    import torch
    from lightning.pytorch import LightningModule

    from treg_lightning.training.trainer import TRegTrainer

    class Doubler(LightningModule):
        def predict_step(self, batch):
            return batch * 2

    loader = torch.utils.data.DataLoader(torch.arange(4.0), batch_size=2)
    trainer = TRegTrainer(accelerator="cpu", logger=False, enable_progress_bar=False)
    got = trainer.predict(Doubler(), loader)  # by position, as Lightning's
    assert [t.tolist() for t in got] == [[0.0, 2.0], [4.0, 6.0]]


# --- the tests mirror the package -------------------------------------------------------------

TESTS = Path(__file__).resolve().parent
# Test folders that test something other than a package of src/: the benchmarks (bench/) and the
# documentation pages (docs/).
OTHER_TEST_FOLDERS = {"bench", "docs"}
# Test files at the top of tests/: the root modules they test, or the package as a whole.
TOP_LEVEL_TESTS = {
    "test_metrics.py": "treg_lightning.metrics",
    "test_pairs.py": "treg_lightning.pairs",
    "test_imports.py": "the package: what importing it loads",
    "test_layout.py": "the package: its layering",
    "test_private_hooks.py": "the package: the private API of its dependencies it uses",
    "test_version.py": "the package: its one version number",
    "test_gpu.py": "the package on CUDA (bench/gpu_check.sh runs it)",
}


def test_tests_mirror_the_package_layout():
    packages = {p.name for p in SRC.iterdir() if (p / "__init__.py").is_file()}
    folders = {p.name for p in TESTS.iterdir() if p.is_dir() and p.name != "__pycache__"}
    assert folders - packages - OTHER_TEST_FOLDERS == set(), "a test folder names no package"
    top = {p.name for p in TESTS.glob("test_*.py")}
    assert top == set(TOP_LEVEL_TESTS), "a test file at the top of tests/: move it to its package"
    for name, what in TOP_LEVEL_TESTS.items():
        if what.startswith(PKG):
            assert what in FILES, f"{name} names {what}, which is no module"


def test_test_file_names_are_unique():
    """pytest imports test files by their base name (no __init__.py under tests/)."""
    names = [p.name for p in TESTS.rglob("test_*.py")]
    assert len(names) == len(set(names)), sorted(n for n in names if names.count(n) > 1)
