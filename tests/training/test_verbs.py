"""Every verb of `treg` is made the same way: a `TRegTrainer` method whose settings are dataclass
groups, each knob declared once; every flag has the help of the docstring under its field; a
group refuses a bad value when it is made, before anything loads; `treg plan` builds nothing."""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import sys
import textwrap
import typing
from pathlib import Path
from unittest import mock

import pytest

from treg_lightning.answers.evaluation import EvaluateSettings
from treg_lightning.answers.generation import Decoding, SamplingSettings
from treg_lightning.answers.onpolicy import PairsSettings
from treg_lightning.answers.settings import GenerationSettings, PromptSet
from treg_lightning.cli.main import TRegCLI, cli_main
from treg_lightning.errors import ConfigError
from treg_lightning.outputs import Output
from treg_lightning.training.trainer import TRegTrainer

ROOT = Path(__file__).resolve().parents[2]
VERBS = ("annotate", "export", "predict", "evaluate", "audit", "pairs", "plan")
# What a verb runs on, as Lightning names it (not settings): the model, the data, the weights.
LIGHTNING = {"self", "cls", "model", "datamodule", "dataloaders", "return_predictions",
             "weights_only", "ckpt_path", "config"}  # fmt: skip


def hints(verb: str) -> dict[str, object]:
    method = getattr(TRegTrainer, verb)
    names = set(inspect.signature(method).parameters) - LIGHTNING
    return {name: hint for name, hint in typing.get_type_hints(method).items() if name in names}


def group_of(hint) -> type | None:
    """The settings dataclass of a parameter's type (``list[EvalRun] | None``: ``EvalRun``)."""
    if dataclasses.is_dataclass(hint):
        return hint
    return next(filter(None, map(group_of, typing.get_args(hint))), None)


def groups(verb: str) -> dict[str, type]:
    return {name: g for name, hint in hints(verb).items() if (g := group_of(hint)) is not None}


def declaring_class(cls: type, name: str) -> type:
    return next(c for c in cls.__mro__ if name in c.__dict__.get("__annotations__", {}))


def test_every_verb_takes_groups_or_components_no_flat_knob():
    """A verb's parameters beyond Lightning's are settings dataclasses (or a list of them) and
    components chosen by class path; no int / float / str / bool knob of its own."""
    flat = {
        f"{verb}.{name}"
        for verb in VERBS
        for name, hint in hints(verb).items()
        if group_of(hint) is None
        and not any(
            inspect.isclass(t) and t.__module__.startswith("treg_lightning")
            for t in (hint, *typing.get_args(hint))
        )
    }
    assert flat == set()
    assert {verb: sorted(groups(verb)) for verb in VERBS} == {
        "annotate": [],
        "export": ["export", "output"],
        "predict": ["generation", "output", "prompts", "sampling"],
        "evaluate": ["evaluate", "output", "runs"],
        "audit": ["audit", "output"],
        "pairs": ["generation", "output", "pairs", "prompts", "sampling"],
        "plan": ["plan"],
    }


def test_no_knob_is_declared_by_two_verbs():
    """Each field name of every verb's settings is declared by exactly one class; a knob two
    verbs share is the same dataclass in both signatures."""
    declared: dict[str, set[type]] = {}
    users: dict[type, set[str]] = {}
    for verb in VERBS:
        for group in groups(verb).values():
            for field in dataclasses.fields(group):
                declared.setdefault(field.name, set()).add(declaring_class(group, field.name))
                users.setdefault(declaring_class(group, field.name), set()).add(verb)
    twice = {name: sorted(c.__qualname__ for c in classes)
             for name, classes in declared.items() if len(classes) > 1}  # fmt: skip
    assert twice == {}
    assert users[Output] == {"export", "predict", "evaluate", "audit", "pairs"}
    assert users[Decoding] == users[PromptSet] == users[GenerationSettings] == {"predict", "pairs"}
    assert users[SamplingSettings] == {"predict"}  # its seed; pairs seeds each sample itself
    assert declaring_class(SamplingSettings, "temperature") is Decoding


# --- help: the docstring under each field, in `treg VERB --help` ---------------------------------


def attribute_docstrings(cls: type) -> dict[str, str]:
    """``{field: the string literal right under it}``, read from the class's source."""
    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
    docs = {}
    for node, after in zip(body, body[1:], strict=False):
        if isinstance(node, ast.AnnAssign) and isinstance(after, ast.Expr):
            if isinstance(after.value, ast.Constant) and isinstance(after.value.value, str):
                docs[node.target.id] = inspect.cleandoc(after.value.value)
    return docs


def flag_help(help_text: str, flag: str) -> str:
    """The help of ``flag`` in ``treg VERB --help`` (wrapped lines joined, no whitespace)."""
    lines = help_text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip().split(" ")[0] == flag)
    block = [lines[start].strip().removeprefix(flag)]
    for line in lines[start + 1 :]:
        if not line.strip() or line.lstrip().startswith("-"):
            break
        block.append(line)
    return "".join("".join(block).split())


@pytest.mark.parametrize("verb", VERBS)
def test_every_flag_of_every_verb_has_its_help(verb, capsys):
    with mock.patch.object(sys, "argv", ["treg"]), pytest.raises(SystemExit) as done:
        cli_main([verb, "--help"])
    assert done.value.code in (0, None)
    text = capsys.readouterr().out
    for name, group in groups(verb).items():
        if name == "runs":  # a list of runs, given whole: its help is the parameter's
            assert "held-outpairmetricsneed" in flag_help(text, "--runs")
            continue
        for field in dataclasses.fields(group):
            doc = attribute_docstrings(declaring_class(group, field.name))[field.name]
            assert "".join(doc.split()) in flag_help(text, f"--{name}.{field.name}"), field.name
    for name in hints(verb):
        if name not in groups(verb):  # a component: the help of the method's docstring
            assert len(flag_help(text, f"--{name}")) > 20, name


def parse_error(args: list[str], capsys) -> str:
    with mock.patch.object(sys, "argv", ["treg"]), pytest.raises(SystemExit) as done:
        cli_main(args)
    assert done.value.code == 2
    return capsys.readouterr().err


def test_a_flat_flag_is_pointed_to_its_group(capsys):
    """The flags of the settings groups are never abbreviated: ``--seed`` is no
    ``--seed_everything``, it points to ``--sampling.seed``."""
    err = parse_error(["predict", "--temperature=0.5", "--seed", "3"], capsys)
    assert "Did you mean '--sampling.temperature', '--sampling.seed'?" in err, err
    err = parse_error(["plan", "--gpu-memory", "80GB"], capsys)
    assert "Did you mean '--plan.gpu_memory'?" in err, err


def test_a_file_given_to_a_group_names_the_groups_flags(tmp_path, capsys):
    answers = tmp_path / "answers.jsonl"
    answers.write_text('{"prompt": "a"}\n{"prompt": "b"}\n')
    err = parse_error(["predict", f"--output={tmp_path / 'new.jsonl'}"], capsys)
    assert "--output alone takes the whole output group as a YAML file or string; one " in err
    assert "setting of it is a flag of its own: --output.overwrite, --output.path." in err
    err = parse_error(["pairs", f"--prompts={answers}"], capsys)
    assert "flag of its own: --prompts.file, --prompts.limit, --prompts.split." in err, err


@dataclasses.dataclass(frozen=True)
class Greeting:
    """The settings of a verb of one's own (module level: the parser resolves the annotations
    of the method by name)."""

    words: int = 2
    """How many words the greeting has."""


class MyTrainer(TRegTrainer):
    def greet(self, model=None, datamodule=None, *, greeting: Greeting = Greeting(),
              output: Output = Output("greeting.txt")) -> None:  # fmt: skip
        """Write a greeting."""
        Path(output.path).write_text(" ".join(["hello"] * greeting.words))


class MyCLI(TRegCLI):
    @staticmethod
    def subcommands():
        return {**TRegCLI.subcommands(), "greet": {"model", "datamodule"}}


def test_a_verb_of_ones_own_is_made_the_same_way(tmp_path, capsys):
    """A `TRegTrainer` subclass method with dataclass settings, named in a `TRegCLI` subclass's
    subcommands, gets `--GROUP.FIELD` flags with the field docstrings as help, and runs."""
    out = tmp_path / "hi.txt"
    args = ["greet", "--config", str(ROOT / "configs/demo.yaml"), "--trainer.logger=false"]
    with mock.patch.object(sys, "argv", ["treg"]):
        MyCLI(trainer_class=MyTrainer, args=[*args, "--greeting.words=3", f"--output.path={out}"])
        with pytest.raises(SystemExit):
            MyCLI(trainer_class=MyTrainer, args=["greet", "--help"])
    assert out.read_text() == "hello hello hello"
    text = capsys.readouterr().out
    assert "Howmanywordsthegreetinghas." in flag_help(text, "--greeting.words")
    assert "default:greeting.txt" in flag_help(text, "--output.path")


# --- a group refuses a bad value when it is made ---------------------------------------------


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: Output(""), "--output.path is empty"),
        (lambda: GenerationSettings(batch_size=0), "--generation.batch_size 0: give a number"),
        (lambda: GenerationSettings(shard_size=-2), "--generation.shard_size -2: give a number"),
        (lambda: Decoding(max_new_tokens=0), "--sampling.max_new_tokens must be >= 1, got 0"),
        (lambda: SamplingSettings(temperature=-1.0), "--sampling.temperature must be >= 0"),
        (lambda: Decoding(top_p=0.0), r"--sampling.top_p must be in \(0, 1\], got 0.0"),
        (lambda: PairsSettings(k=1), "k >= 2"),
        (lambda: PairsSettings(k=3, seeds=[1, 2]), r"--pairs.k \(3\) and the number of"),
        (lambda: PairsSettings(seeds=[4, 4]), r"--pairs.seeds \[4, 4\] repeat a seed"),
        (lambda: EvaluateSettings(reward_batch_size=0), "--evaluate.reward_batch_size 0"),
        (lambda: EvaluateSettings(answer_max_new_tokens=0), "--evaluate.answer_max_new_tokens 0"),
    ],
)
def test_a_group_refuses_a_bad_value(make, message):
    with pytest.raises(ConfigError, match=message):
        make()


def refused(args: list[str], capsys) -> str:
    from builders import no_model_load

    with (
        no_model_load("treg_lightning.data.datamodule.PreferenceDataModule.tokenized_rows"),
        mock.patch.object(sys, "argv", ["treg"]),
        pytest.raises(SystemExit) as done,
    ):
        cli_main(args)
    err = capsys.readouterr().err
    assert done.value.code == 2 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["predict", "--generation.batch_size=0"], "error: --generation.batch_size 0: give"),
        (["pairs", "--sampling.temperature=0"], "error: pairs samples with --sampling.temper"),
        (["evaluate", "--evaluate.reward_batch_size=0"], "error: --evaluate.reward_batch_size"),
        (["export", "--output.path= "], "error: --output.path is empty"),
    ],
    ids=["predict", "pairs", "evaluate", "export"],
)
def test_bad_settings_end_the_verb_with_status_2(args, message, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    config = ["--config", str(ROOT / "configs/demo.yaml"), "--trainer.logger=false"]
    err = refused([*args[:1], *config, *args[1:]], capsys)
    assert message in err, err
    assert list(tmp_path.iterdir()) == []


# --- `treg plan` builds nothing -----------------------------------------------------------------


def test_plan_builds_no_trainer_model_or_data(capsys, monkeypatch):
    """A GPU config plans on this CPU machine: no trainer (its accelerator would be refused), no
    module or datamodule is made, no seed set; the plan's own settings are a group."""
    from treg_lightning.data.datamodule import PreferenceDataModule
    from treg_lightning.module import PreferenceModule

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    built: list[str] = []

    def spy(cls):  # the constructor, recording each call (its signature kept for the parser)
        real = cls.__init__

        @functools.wraps(real)
        def init(self, *args, **kwargs):
            built.append(cls.__name__)
            real(self, *args, **kwargs)

        monkeypatch.setattr(cls, "__init__", init)

    for cls in (TRegTrainer, PreferenceModule, PreferenceDataModule):
        spy(cls)
    seeded = mock.Mock()
    config = ROOT / "configs/llama3_dpo_treg.yaml"
    with mock.patch("lightning.pytorch.cli.seed_everything", seeded):
        with mock.patch.object(sys, "argv", ["treg"]):
            cli = TRegCLI(args=["plan", "--config", str(config), "--trainer.accelerator=gpu",
                                "--plan.devices=8", "--plan.gpu_memory=80GB"])  # fmt: skip
    out = capsys.readouterr().out
    assert "8 device(s) (8 x 1 node(s))" in out and "of 73.51 GiB usable" in out
    assert built == [] and not seeded.called and not hasattr(cli, "trainer")
    # the spies record: `treg fit` builds all three
    with mock.patch.object(sys, "argv", ["treg"]), mock.patch.object(TRegCLI, "_run_subcommand"):
        TRegCLI(args=["fit", "--config", str(ROOT / "configs/demo.yaml"), "--trainer.logger=false"])
    assert sorted(built) == ["PreferenceDataModule", "PreferenceModule", "TRegTrainer"]
