"""The package's layout holds: imports point down only (no cycle, counting imports inside
functions), the losses load no PEFT glue, the root stays small, the forward pass lives in
``forward/``, checkpoints are read in one place, and the old module names still resolve."""

from __future__ import annotations

import ast
import importlib
import inspect
import subprocess
import sys
from pathlib import Path

import pytest

import treg_lightning
from treg_lightning import MOVED_MODULES, current_path
from treg_lightning.models.checkpoints import upgrade_hparams

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
    found.discard(PKG)  # the package face (its MOVED_MODULES table imports nothing back)
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
    packages: dict[str, set[str]] = {}
    for module, deps in GRAPH.items():
        own = _package(module)
        packages.setdefault(own, set()).update(_package(d) for d in deps if _package(d) != own)
    assert _cycle(packages) is None


# Everything of the package but errors: the pass machinery is on the ground floor.
ABOVE_PASSES = ("pairs", "losses", "forward", "models", "data", "rewards", "module", "metrics",
                "outputs", "training", "answers", "plan", "cli")  # fmt: skip


@pytest.mark.parametrize(
    ("low", "high"),
    [
        ("treg_lightning.pairs", ("losses", "forward", "models", "data", "module")),
        ("treg_lightning.losses", ("forward", "models", "data", "rewards", "cli", "training")),
        ("treg_lightning.forward", ("data", "module", "training", "cli", "answers")),
        ("treg_lightning.rewards", ("losses", "module", "training", "cli", "answers")),
        ("treg_lightning.data", ("module", "training", "cli", "answers", "forward")),
        ("treg_lightning.passes", tuple(ABOVE_PASSES)),
    ],
)
def test_lower_layers_import_nothing_above(low, high):
    above = tuple(f"{PKG}.{name}" for name in high)
    for module, deps in GRAPH.items():
        if module == low or module.startswith(low + "."):
            bad = sorted(d for d in deps if d.startswith(above))
            assert not bad, f"{module} imports {bad}"


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


@pytest.mark.parametrize("old", sorted(MOVED_MODULES))
def test_old_module_names_import_as_the_new_modules(old):
    module = importlib.import_module(f"{PKG}.{old}")
    assert module is importlib.import_module(f"{PKG}.{MOVED_MODULES[old]}")
    assert module.__spec__.name == f"{PKG}.{MOVED_MODULES[old]}"


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("treg_lightning.adapters.QLoRA", "treg_lightning.models.adapters.QLoRA"),
        ("treg_lightning.generation.VLLMBackend", "treg_lightning.answers.generation.VLLMBackend"),
        (
            "treg_lightning.callbacks.ExportOnFitEnd",
            "treg_lightning.training.callbacks.ExportOnFitEnd",
        ),
        ("treg_lightning.guards.NonFiniteGuard", "treg_lightning.training.guards.NonFiniteGuard"),
        (
            "treg_lightning.schedulers.WarmupCosineLR",
            "treg_lightning.training.schedulers.WarmupCosineLR",
        ),
        ("treg_lightning.rewards.ContrastiveRewards", "treg_lightning.rewards.ContrastiveRewards"),
        ("treg_lightning.losses.DPOLoss", "treg_lightning.losses.DPOLoss"),
    ],
)
def test_old_class_paths_resolve_and_upgrade(old, new):
    module, name = old.rsplit(".", 1)
    assert getattr(importlib.import_module(module), name) is getattr(
        importlib.import_module(new.rsplit(".", 1)[0]), name
    )
    assert current_path(old) == new
    hparams = {"scheduler": {"class_path": old, "init_args": {"x": [{"class_path": old}]}}}
    upgraded = upgrade_hparams(hparams)
    assert upgraded["scheduler"]["class_path"] == new
    assert upgraded["scheduler"]["init_args"]["x"][0]["class_path"] == new
    assert hparams["scheduler"]["class_path"] == old  # the input is not changed


def test_verbs_keep_lightnings_signatures():
    """``TRegTrainer.predict`` takes Lightning's arguments in Lightning's order (its own settings
    are keyword-only), and ``plan`` is no Trainer method."""
    from lightning.pytorch import Trainer

    from treg_lightning.training.trainer import TRegTrainer

    ours = inspect.signature(TRegTrainer.predict).parameters
    theirs = list(inspect.signature(Trainer.predict).parameters)
    positional = [n for n, p in ours.items() if p.kind is p.POSITIONAL_OR_KEYWORD]
    assert positional == theirs
    assert not hasattr(TRegTrainer, "plan")


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
