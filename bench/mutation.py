"""Mutation check: put each curated bug (``bench/mutations.py``) into a copy of the code, one at a
time, run the tests that must catch it, and report killed / survived.

The repository's ``src/``, ``tests/`` and ``pyproject.toml`` are copied to a temporary folder;
pytest runs there with ``PYTHONPATH`` at the copy's ``src`` (first), so the mutated copy is what
the tests and their subprocesses import, not the installed package. Every edit must match exactly
once in the unmutated copy (checked for all mutations before anything runs). No bytecode is
written, so a restored file is never shadowed by the mutant's ``.pyc``.

A mutation is *killed* when its tests fail (pytest exit status 1), *survived* when they pass, an
*error* on any other status (tests not found, collection error, timeout). The script exits 1
unless every mutation is killed.

Usage::

    python bench/mutation.py                 # all mutations (make mutation)
    python bench/mutation.py --list          # the mutations and their tests
    python bench/mutation.py --only ckpt     # those whose name contains "ckpt"
    python bench/mutation.py --baseline      # first run all their tests unmutated (must pass)
    python bench/mutation.py --all-tests     # every test of each mutation, naming those failing
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mutations import MUTATIONS, Mutation

ROOT = Path(__file__).resolve().parents[1]
COPIED = ("src", "tests", "pyproject.toml")


def copy_repo(target: Path) -> None:
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache")
    for name in COPIED:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, target / name, ignore=ignore)
        else:
            shutil.copy2(source, target / name)


def check_edits(copy: Path, mutations: list[Mutation]) -> list[str]:
    """Problems: an edit whose ``old`` text does not occur exactly once in its file."""
    problems = []
    for m in mutations:
        for edit in m.edits:
            path = copy / edit.path
            count = path.read_text().count(edit.old) if path.is_file() else -1
            if count != 1:
                where = "file missing" if count < 0 else f"matches {count} times"
                problems.append(f"{m.name}: {edit.path}: {where}: {edit.old!r}")
    return problems


def environment(copy: Path) -> dict[str, str]:
    inherited = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(copy / "src"), *inherited]),
        "PYTHONDONTWRITEBYTECODE": "1",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }


def check_import(copy: Path) -> None:
    """The copy's treg_lightning, not the installed one, is what its tests will import."""
    found = subprocess.run(
        [sys.executable, "-c", "import treg_lightning; print(treg_lightning.__file__)"],
        cwd=copy,
        env=environment(copy),
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    if not Path(found).resolve().is_relative_to((copy / "src").resolve()):
        raise SystemExit(f"the copy's tests would import {found}, not the copy in {copy}")


def run_tests(
    copy: Path, tests: tuple[str, ...], timeout: float, stop_early: bool = True
) -> tuple[int, str]:
    """(pytest exit status, or -1 on timeout; its output, the failures' summary included)."""
    command = [sys.executable, "-m", "pytest", "-q", "-rfE", "-p", "no:cacheprovider", *tests]
    if stop_early:
        command.insert(3, "-x")
    process = subprocess.Popen(
        command,
        cwd=copy,
        env=environment(copy),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # the tests' own subprocesses (ranks) die with it on timeout
    )
    try:
        output, _ = process.communicate(timeout=timeout)
        return process.returncode, output
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        return -1, output


def apply(copy: Path, m: Mutation) -> dict[Path, str]:
    """Write the mutant; returns the original text of every file it changed."""
    originals: dict[Path, str] = {}
    for edit in m.edits:
        path = copy / edit.path
        text = path.read_text()
        originals.setdefault(path, text)
        path.write_text(text.replace(edit.old, edit.new, 1))
    return originals


def restore(originals: dict[Path, str]) -> None:
    for path, text in originals.items():
        path.write_text(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", action="append", default=[], help="name substring (repeatable)")
    parser.add_argument("--list", action="store_true", help="print the mutations and exit")
    parser.add_argument("--baseline", action="store_true", help="run all tests unmutated first")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per mutation")
    parser.add_argument("--keep", action="store_true", help="keep the temporary copy")
    parser.add_argument(
        "--all-tests",
        action="store_true",
        help="run every test of a mutation (no -x) and name each that failed",
    )
    args = parser.parse_args(argv)
    chosen = [
        m for m in MUTATIONS if not args.only or any(s.lower() in m.name.lower() for s in args.only)
    ]
    if args.list:
        for m in chosen:
            files = ", ".join(sorted({e.path for e in m.edits}))
            print(f"{m.name}\n  in: {files}\n  tests: {' '.join(m.tests)}")
        return 0
    copy = Path(tempfile.mkdtemp(prefix="treg-mutation-"))
    try:
        copy_repo(copy)
        problems = check_edits(copy, MUTATIONS)  # all of them, whichever are run
        if problems:
            print("mutations that no longer apply exactly once:\n  " + "\n  ".join(problems))
            return 2
        check_import(copy)
        if args.baseline:
            tests = tuple(dict.fromkeys(t for m in chosen for t in m.tests))
            start = time.monotonic()
            status, output = run_tests(copy, tests, args.timeout * 2)
            print(
                f"baseline ({len(tests)} test ids): status {status}, "
                f"{time.monotonic() - start:.0f} s",
                flush=True,
            )
            if status != 0:
                print(output[-3000:])
                return 2
        results = []
        for i, m in enumerate(chosen, 1):
            originals = apply(copy, m)
            start = time.monotonic()
            try:
                status, output = run_tests(copy, m.tests, args.timeout, not args.all_tests)
            finally:
                restore(originals)
            seconds = time.monotonic() - start
            verdict = {1: "killed", 0: "SURVIVED"}.get(status, f"ERROR ({status})")
            results.append((m, verdict, seconds))
            print(f"[{i}/{len(chosen)}] {verdict:<10} {seconds:6.0f} s  {m.name}", flush=True)
            for line in output.splitlines():
                if line.startswith(("FAILED ", "ERROR ")):
                    print(f"    {line[:160]}", flush=True)
            if verdict != "killed":
                print("    " + output[-2000:].replace("\n", "\n    "), flush=True)
        print_table(results)
        return 0 if all(verdict == "killed" for _, verdict, _ in results) else 1
    finally:
        if args.keep:
            print(f"copy kept in {copy}")
        else:
            shutil.rmtree(copy, ignore_errors=True)


def print_table(results: list[tuple[Mutation, str, float]]) -> None:
    print("\n| mutation | file | tests | result | seconds |\n|---|---|---|---|---|")
    for m, verdict, seconds in results:
        files = ", ".join(sorted({e.path.removeprefix("src/treg_lightning/") for e in m.edits}))
        tests = ", ".join(t.removeprefix("tests/") for t in m.tests)
        print(f"| {m.name} | {files} | {tests} | {verdict} | {seconds:.0f} |")
    killed = sum(verdict == "killed" for _, verdict, _ in results)
    total = sum(seconds for _, _, seconds in results)
    print(
        f"\n{killed} of {len(results)} mutations killed, {len(results) - killed} not; "
        f"{total:.0f} s of tests"
    )


if __name__ == "__main__":
    sys.exit(main())
