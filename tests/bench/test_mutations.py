"""The curated mutations of ``make mutation`` (``bench/mutations.py``) still apply: each edit
matches its file exactly once and each named test exists, so moving a line or a test fails the
suite here instead of stopping the mutation check before its first mutation."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from builders import load_bench

ROOT = Path(__file__).resolve().parents[2]
MUTATIONS = load_bench("mutations").MUTATIONS


def test_names_are_unique_and_every_mutation_names_a_test():
    names = [m.name for m in MUTATIONS]
    assert len(names) == len(set(names))
    assert all(m.tests and m.edits for m in MUTATIONS)


@pytest.mark.parametrize("mutation", MUTATIONS, ids=lambda m: m.name)
def test_each_edit_matches_exactly_once_and_changes_the_code(mutation):
    for edit in mutation.edits:
        text = (ROOT / edit.path).read_text()
        assert text.count(edit.old) == 1, f"{edit.path}: {edit.old!r}"
        assert edit.old != edit.new
        mutated = text.replace(edit.old, edit.new)
        ast.parse(mutated)  # a mutant is a bug in the logic, not a syntax error


def defined_functions(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {
        n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
    }


@pytest.mark.parametrize("mutation", MUTATIONS, ids=lambda m: m.name)
def test_each_named_test_exists(mutation):
    for test_id in mutation.tests:
        file, _, name = test_id.partition("::")
        assert (ROOT / file).is_file(), test_id
        assert name.split("[")[0] in defined_functions(ROOT / file), test_id
