"""Every command the README and the docs show parses, with the real `treg` parser, running nothing.

The commands come from the fenced shell blocks of README.md, docs/*.md and bench/README.md (lines
joined at a trailing backslash, comments dropped, shell variables of the block filled in). A
`treg` command is parsed by the parser `treg` itself builds (its `LightningCLI` subcommands), so a
renamed flag, a misspelt key or a missing config file fails here; `make
TARGET` must be a Makefile target, `python bench/X.py` / `bench/X.sh` a file, `python -m MODULE` a
module. YAML blocks must load, and those holding run settings must parse on top of the demo
config; Python blocks must compile. The flag tables of docs/reference.md must list exactly the
flags each verb has.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import pytest
import yaml

from treg_lightning.cli.main import TRegCLI

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "bench" / "README.md"]
SHELL = {"bash", "sh", "shell", "console", ""}
FENCE = re.compile(r"^```([\w-]*)[^\n]*\n(.*?)^```", re.M | re.S)
# Flags every verb has (docs/reference.md, "Flags of every verb"), and parser internals.
COMMON = {"--config", "--print_config", "--help", "--seed_everything", "--guard", "--debug",
          "--model", "--data", "--trainer"}  # fmt: skip


@dataclass(frozen=True)
class Block:
    page: Path
    line: int  # of the opening fence, 0-based
    lang: str
    text: str

    def where(self, offset: int = 0) -> str:
        page = self.page.relative_to(ROOT) if self.page.is_relative_to(ROOT) else self.page
        return f"{page}:{self.line + 2 + offset}"  # 1-based, after the fence


@dataclass(frozen=True)
class Command:
    where: str
    argv: tuple[str, ...]

    def __str__(self) -> str:
        return f"{self.where}: {shlex.join(self.argv)}"


def fenced_blocks(pages=PAGES) -> list[Block]:
    blocks = []
    for page in pages:
        text = page.read_text()
        for match in FENCE.finditer(text):
            line = text.count("\n", 0, match.start())
            blocks.append(Block(page, line, match.group(1).lower(), match.group(2)))
    return blocks


def logical_lines(text: str) -> list[tuple[int, str]]:
    """``(offset of the first line, line)`` with backslash continuations joined."""
    lines, start, parts = [], 0, []
    for i, raw in enumerate(text.splitlines()):
        if not parts:
            start = i
        if raw.rstrip().endswith("\\"):
            parts.append(raw.rstrip()[:-1])
            continue
        parts.append(raw)
        lines.append((start, " ".join(p.strip() for p in parts)))
        parts = []
    if parts:
        lines.append((start, " ".join(p.strip() for p in parts)))
    return lines


def expand(line: str, variables: dict[str, str]) -> str:
    """Shell variables of the block filled in (unknown ones: a stand-in word), arithmetic: 1."""
    line = re.sub(r"\$\(\([^)]*\)\)", "1", line)
    return re.sub(r"\$\{?(\w+)\}?", lambda m: variables.get(m.group(1), "VALUE"), line)


def commands(blocks: list[Block]) -> list[Command]:
    found = []
    for block in blocks:
        if block.lang not in SHELL:
            continue
        variables: dict[str, str] = {}
        for offset, line in logical_lines(block.text):
            words = shlex.split(expand(line.lstrip("$ "), variables), comments=True)
            loop = re.match(r"for (\w+) in (\S+)", line.strip())
            if loop:  # the first pass of the loop
                variables[loop.group(1)] = loop.group(2)
                continue
            if len(words) == 1 and re.fullmatch(r"\w+=.*", words[0]):
                name, value = words[0].split("=", 1)
                variables[name] = value
                continue
            while words and (words[0] in ("time", "eval") or re.fullmatch(r"\w+=\S*", words[0])):
                words = words[1:]
            if words and (words[0] in ("treg", "make", "python") or words[0].startswith("bench/")):
                found.append(Command(block.where(offset), tuple(words)))
    return found


DOC_BLOCKS = fenced_blocks()
DOC_COMMANDS = commands(DOC_BLOCKS)
TREG = [c for c in DOC_COMMANDS if c.argv[0] == "treg"]
OTHER = [c for c in DOC_COMMANDS if c.argv[0] != "treg"]


class _ParserBuilt(Exception):
    """Stops ``TRegCLI`` once its parser exists: nothing is parsed or instantiated."""


class _ParserOnly(TRegCLI):
    def parse_arguments(self, parser, args) -> None:
        raise _ParserBuilt(parser)


@pytest.fixture(scope="module")
def treg_parser():
    """The parser `treg` builds (every subcommand), without running anything."""
    with mock.patch.object(sys, "argv", ["treg"]), pytest.raises(_ParserBuilt) as built:
        _ParserOnly(args=[])
    return built.value.args[0]


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.chdir(ROOT)  # config paths in the docs are relative to the checkout


def parse_treg(parser, argv: list[str]) -> None:
    """Parse ``treg ARGV`` as the command would; a parse error fails with the parser's message.
    ``--help`` prints and exits 0; ``--print_config`` is taken off (it would print the config)."""
    argv = [a for a in argv if a != "--print_config"]
    helps = "--help" in argv
    for flag, value in zip(argv, argv[1:], strict=False):
        if flag in ("--config", "-c"):
            assert (ROOT / value).is_file(), f"--config {value}: no such file"
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            parser.parse_args(argv)
    except SystemExit as stop:
        if not (helps and stop.code in (0, None)):
            pytest.fail(f"does not parse (exit {stop.code}): {err.getvalue().strip()}")
    else:
        assert not helps, "--help did not exit"


def test_the_docs_show_commands():
    verbs = {c.argv[1] for c in TREG if len(c.argv) > 1}
    every = {"fit", "validate", "test", "annotate", "export", "predict", "evaluate", "audit"}
    assert every | {"pairs", "plan"} <= verbs
    assert any(c.argv[:2] == ("make", "demo") for c in OTHER)


@pytest.mark.parametrize("command", TREG, ids=str)
def test_treg_command_parses(command, treg_parser):
    parse_treg(treg_parser, list(command.argv[1:]))


def make_targets() -> set[str]:
    text = (ROOT / "Makefile").read_text()
    return set(re.findall(r"^([\w-]+):", text, re.M))


@pytest.mark.parametrize("command", OTHER, ids=str)
def test_other_command_exists(command):
    argv = command.argv
    if argv[0] == "make":
        targets = [a for a in argv[1:] if not a.startswith("-") and "=" not in a] or ["install"]
        assert set(targets) <= make_targets(), f"no Makefile target {targets}"
    elif argv[0] == "python" and argv[1] == "-m":
        assert importlib.util.find_spec(argv[2]) is not None, f"no module {argv[2]}"
    else:
        script = argv[1] if argv[0] == "python" else argv[0]
        assert (ROOT / script).is_file(), f"no file {script}"


# --- YAML and Python blocks ------------------------------------------------------------------


def yaml_documents() -> list[tuple[str, object]]:
    docs = []
    for block in DOC_BLOCKS:
        if block.lang == "yaml":
            for i, doc in enumerate(yaml.safe_load_all(block.text)):
                docs.append((f"{block.where()}#{i}", doc))
    return docs


YAML_DOCS = yaml_documents()


@pytest.mark.parametrize(("where", "doc"), YAML_DOCS, ids=[w for w, _ in YAML_DOCS])
def test_yaml_block_parses_as_run_settings(where, doc, treg_parser, tmp_path):
    assert isinstance(doc, dict) and set(doc) <= {"trainer", "model", "data"}, where
    snippet = tmp_path / "snippet.yaml"
    snippet.write_text(yaml.safe_dump(doc))
    parse_treg(treg_parser, ["fit", "--config", "configs/demo.yaml", "--config", str(snippet)])


@pytest.mark.parametrize(
    "block", [b for b in DOC_BLOCKS if b.lang == "python"], ids=lambda b: b.where()
)
def test_python_block_compiles(block):
    compile(block.text, block.where(), "exec")


# --- docs/reference.md lists every flag of every verb -----------------------------------------


def reference_flags() -> dict[str, set[str]]:
    """``{verb: flags in the first column of its section's tables}``."""
    text = (ROOT / "docs" / "reference.md").read_text()
    sections = re.split(r"^## ", text, flags=re.M)
    flags = {}
    for section in sections:
        verb = re.match(r"`treg (\w+)`", section)
        if verb:
            rows = re.findall(r"^\| `(--[\w.-]+)`", section, re.M)
            flags[verb.group(1)] = set(rows)
    return flags


def own_flags(parser) -> set[str]:
    """The verb's flags; a settings group's own flag (``--sampling``, the whole group as YAML)
    is documented once, in "Flags of every verb", its fields per verb."""
    names = {o for a in parser._actions for o in a.option_strings if o.startswith("--")}
    names = {n for n in names if not n.endswith((".help", "+"))}
    groups = {n for n in names if any(m.startswith(n + ".") for m in names)}
    return {
        n for n in names - groups
        if n not in COMMON and not n.startswith(("--model.", "--data.", "--trainer.", "--guard."))
    }  # fmt: skip


def test_reference_lists_every_flag_of_every_verb(treg_parser):
    documented = reference_flags()
    subparsers = treg_parser._subcommands_action._name_parser_map
    actual = {verb: own_flags(p) for verb, p in subparsers.items()}
    assert set(documented) == set(actual), "docs/reference.md: one section per verb"
    for verb, flags in actual.items():
        assert documented[verb] == flags, (
            f"treg {verb}: documented but absent {sorted(documented[verb] - flags)}, "
            f"absent from docs/reference.md {sorted(flags - documented[verb])}"
        )


# --- the extraction itself ------------------------------------------------------------------


def test_extraction_joins_lines_fills_variables_and_drops_comments(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        "text\n```bash\nPOLICY=smollm2   # policy 0\nfor r in 0 1; do\n"
        "  treg pairs --model.model $POLICY \\\n      --output out/round$r/pairs.jsonl  # x\n"
        "done\ntime make demo\n```\n```yaml\nmodel: {}\n```\n"
    )
    found = commands(fenced_blocks([page]))
    assert [c.argv for c in found] == [
        ("treg", "pairs", "--model.model", "smollm2", "--output", "out/round0/pairs.jsonl"),
        ("make", "demo"),
    ]
    assert found[0].where.endswith("page.md:5")


def test_the_documented_token_reward_source_runs():
    """The token-reward source of docs/lightning.md is a complete source: it instantiates (no
    abstract method left) and gives one reward per response token of each row."""
    block = next(b for b in DOC_BLOCKS if b.lang == "python" and "class ParityRewards" in b.text)
    namespace: dict = {}
    exec(compile(block.text, block.where(), "exec"), namespace)
    source = namespace["ParityRewards"]()
    row = {"prompt_ids": [1, 2], "chosen_ids": [4, 7, 2], "rejected_ids": [3]}
    (out,) = source.annotate([row], "train", context=None)
    assert out["chosen_token_rewards"] == [0.25, -0.25, 0.25]
    assert out["rejected_token_rewards"] == [-0.25]
    assert source.provides_token_rewards and not source.provides_reference_logps
