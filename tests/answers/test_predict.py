"""`treg predict`: batched = one-by-one greedy answers, the end-of-turn stop, prompt files,
checkpoints (.ckpt, sharded folder) = exported folder, no overwrite, fingerprinted resume after
an exception and after kill -9, two DDP processes = one process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

import pytest
import torch

from builders import CLI_PAIRS, write_pairs, write_pause_kit
from treg_lightning.answers.generation import SamplingSettings, TransformersBackend, cut_at_stop
from treg_lightning.answers.predictions import AnswerJob, PredictJob, PredictSettings, run_predict
from treg_lightning.answers.settings import GenerationSettings
from treg_lightning.cli.main import TRegCLI, TRegTrainer
from treg_lightning.data.errors import DataFormatError
from treg_lightning.data.prompt_files import read_prompts_file
from treg_lightning.outputs import Output, OutputFolderError

SRC = Path(__file__).resolve().parents[2] / "src"
PROMPTS = [
    "Hi",
    "What is the capital of France, and why is it that city?",
    ["not a message"],  # replaced below by a message list
    "Name three colors.",
    "Spell cat backwards, please.",
]


def cli_main(args: list[str]) -> TRegCLI:
    with mock.patch.object(sys, "argv", ["treg"]):
        return TRegCLI(args=args)


class Loaded:
    """A PolicyLoader over a model already in memory."""

    def __init__(self, model):
        self.model = model

    def load(self):
        return self.model

    def folder(self, work_dir):
        raise NotImplementedError


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from treg_lightning.data.tokenize import PairTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    pair = PairTokenizer(tokenizer, max_length=128, max_prompt_length=100)
    texts = [p for p in PROMPTS if isinstance(p, str)]
    prompt_ids = [pair.prompt_ids([{"role": "user", "content": t}]) for t in texts]
    return {"tokenizer": tokenizer, "model": model, "prompt_ids": prompt_ids}


def backend_for(model, tokenizer) -> TransformersBackend:
    backend = TransformersBackend()
    backend.setup(Loaded(model), tokenizer, torch.device("cpu"), Path("."))
    return backend


def test_batched_left_padded_equals_one_by_one(tiny):
    backend = backend_for(tiny["model"], tiny["tokenizer"])
    sampling = SamplingSettings(max_new_tokens=12, temperature=0.0)
    ids = tiny["prompt_ids"]
    assert len({len(i) for i in ids}) == len(ids)  # all lengths differ: real left padding
    batched = backend.generate(ids, sampling, key="b")
    alone = [backend.generate([one], sampling, key="a")[0] for one in ids]
    assert [g.token_ids for g in batched] == [g.token_ids for g in alone]
    assert all(len(g.token_ids) == 12 and g.finish_reason == "length" for g in batched)
    assert len({tuple(g.token_ids) for g in batched}) > 1  # answers depend on the prompt
    assert backend.generate(ids, sampling, key="c") == batched  # greedy: deterministic


def test_sampling_is_seeded_per_batch(tiny):
    backend = backend_for(tiny["model"], tiny["tokenizer"])
    ids = tiny["prompt_ids"][:2]
    hot = SamplingSettings(max_new_tokens=10, temperature=1.0, top_p=0.95, seed=3)
    first = backend.generate(ids, hot, key="0:0")
    assert backend.generate(ids, hot, key="0:0") == first
    other = SamplingSettings(max_new_tokens=10, temperature=1.0, top_p=0.95, seed=4)
    assert backend.generate(ids, other, key="0:0") != first


def test_generation_stops_at_the_end_of_turn_token(tiny, tiny_model_dir):
    """Declare the token greedy decoding emits 4th as the end-of-turn (EOS) token: the answer
    is the 3 tokens before it, finish_reason "stop"."""
    from transformers import AutoTokenizer

    ids = tiny["prompt_ids"][1]
    free = backend_for(tiny["model"], tiny["tokenizer"]).generate(
        [ids], SamplingSettings(max_new_tokens=12), key="x"
    )[0]
    fourth = free.token_ids[3]
    assert fourth not in free.token_ids[:3]
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.eos_token = tokenizer.convert_ids_to_tokens(fourth)
    assert tokenizer.eos_token_id == fourth
    stopped = backend_for(tiny["model"], tokenizer).generate(
        [ids], SamplingSettings(max_new_tokens=12), key="x"
    )[0]
    assert stopped.token_ids == free.token_ids[:3] and stopped.finish_reason == "stop"
    assert cut_at_stop([5, 6, 7], [9], 3).finish_reason == "length"


def test_prompts_file_formats_and_errors(tmp_path):
    path = tmp_path / "prompts.jsonl"
    rows = [
        "Say hi.",
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Why?"}],
        {"prompt": "A prompt field.", "dataset": "mine"},
        {"instruction": "Translate.", "input": "chat"},
        {"messages": [{"role": "user", "content": "From messages."}]},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    prompts = read_prompts_file(path)
    assert [p["messages"][-1]["content"] for p in prompts] == [
        "Say hi.",
        "Why?",
        "A prompt field.",
        "Translate.\n\nchat",
        "From messages.",
    ]
    assert prompts[1]["messages"][0]["role"] == "system"
    assert prompts[2]["extra"] == {"dataset": "mine"}
    path.write_text('"ok"\n{"text": "no prompt field"}\n')
    with pytest.raises(DataFormatError, match=r"line 2.*'prompt'"):
        read_prompts_file(path)
    path.write_text('"ok"\n[{"role": "assistant", "content": "a"}]\n')
    with pytest.raises(
        DataFormatError, match=r"line 2.*prompt ends with user\)\. Fix or remove the row \("
    ):
        read_prompts_file(path)


# --- through the CLI ------------------------------------------------------------------------


def base_args(model: Path, data: Path, out: Path) -> list[str]:
    return [
        f"--model.model={model}",
        f"--data.source={data}",
        "--data.max_length=96",
        "--data.max_prompt_length=64",
        "--data.val_fraction=0.3",
        "--trainer.accelerator=cpu",
        "--trainer.logger=false",
        f"--output.path={out}",
        "--sampling.max_new_tokens=6",
        "--generation.batch_size=2",
        "--generation.shard_size=2",
        "--generation.progress=false",
    ]


@pytest.fixture(scope="module")
def setup(tiny_model_dir, tmp_path_factory):
    """Pairs, a prompts file, a `.ckpt` of perturbed weights, the same weights as a sharded
    (torch.distributed.checkpoint) folder and as an exported Hugging Face folder."""
    import torch.distributed.checkpoint as dcp
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = tmp_path_factory.mktemp("predict")
    data = write_pairs(root / "pairs.jsonl", rows=CLI_PAIRS)
    prompts = root / "prompts.jsonl"
    prompts.write_text(
        "\n".join(json.dumps(p) for p in ["Say hi.", {"prompt": "Count to 3."}, "Why?"]) + "\n"
    )
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    state = {f"policy.{k}": v.clone() for k, v in model.state_dict().items()}
    ckpt = root / "run.ckpt"
    torch.save({"state_dict": state}, ckpt)
    sharded = root / "sharded"
    dcp.save({"state_dict": state}, checkpoint_id=str(sharded))
    exported = root / "exported"
    model.save_pretrained(exported)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(exported)
    return {"root": root, "data": data, "prompts": prompts, "ckpt": ckpt, "sharded": sharded,
            "exported": exported}  # fmt: skip


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_predict_cli_data_prompts_and_no_overwrite(setup, tiny_model_dir):
    out = setup["root"] / "val.jsonl"
    cli_main(["predict", *base_args(tiny_model_dir, setup["data"], out)])
    rows = read(out)
    # val_fraction 0.3 of the 10 pairs: 3 held-out pairs, each with its own prompt
    assert len(rows) == 3 and [r["index"] for r in rows] == [0, 1, 2]
    prompts = {p for p, _, _ in CLI_PAIRS}
    for row in rows:
        assert set(row) >= {"instruction", "output", "generator", "messages", "finish_reason"}
        assert row["instruction"] in prompts and row["generator"] == tiny_model_dir.name
        assert row["messages"] == [
            {"role": "user", "content": row["instruction"]},
            {"role": "assistant", "content": row["output"]},
        ]
        assert row["output_tokens"] == 6 and row["finish_reason"] == "length"
    assert not Path(f"{out}.parts").exists()  # parts removed once merged
    assert "vllm" not in sys.modules  # imported only when its backend is chosen
    before = out.read_bytes()
    with pytest.raises(OutputFolderError, match="--output.overwrite"):
        cli_main(["predict", *base_args(tiny_model_dir, setup["data"], out), "--sampling.seed=5"])
    assert out.read_bytes() == before
    cli_main(["predict", *base_args(tiny_model_dir, setup["data"], out), "--output.overwrite=true",
              "--generation.generator=mine"])  # fmt: skip
    assert [r["generator"] for r in read(out)] == ["mine"] * 3


@pytest.fixture(scope="module")
def single(setup, tiny_model_dir):
    """The untrained tiny model's answers to the prompts file, one process."""
    out = setup["root"] / "single.jsonl"
    args = base_args(tiny_model_dir, setup["data"], out)
    cli_main(["predict", *args, f"--prompts.file={setup['prompts']}", "--generation.shard_size=1"])
    return out


def test_checkpoint_sharded_folder_and_export_give_the_same_answers(setup, tiny_model_dir,
                                                                    single):  # fmt: skip
    args = [f"--prompts.file={setup['prompts']}"]
    outs = {"base": single}
    for name, extra in (
        ("ckpt", [f"--ckpt_path={setup['ckpt']}"]),
        ("sharded", [f"--ckpt_path={setup['sharded']}"]),
        ("exported", []),
    ):
        model = setup["exported"] if name == "exported" else tiny_model_dir
        outs[name] = setup["root"] / f"{name}.jsonl"
        cli_main(["predict", *base_args(model, setup["data"], outs[name]), *args, *extra])
    texts = {name: [r["output"] for r in read(path)] for name, path in outs.items()}
    assert [r["instruction"] for r in read(outs["ckpt"])] == ["Say hi.", "Count to 3.", "Why?"]
    assert texts["ckpt"] == texts["sharded"] == texts["exported"]
    assert texts["ckpt"] != texts["base"]  # the checkpoint's weights were used
    assert read(outs["ckpt"])[0]["generator"] == f"{tiny_model_dir.name}@run"


class FailAfter(TransformersBackend):
    """Raises on its ``calls``-th generate call (an interrupted run)."""

    def __init__(self, calls: int) -> None:
        super().__init__()
        self.calls = calls

    def generate(self, prompt_ids, sampling, key):
        self.calls -= 1
        if self.calls < 0:
            raise KeyboardInterrupt("interrupted")
        return super().generate(prompt_ids, sampling, key)


def predict_direct(model_dir, data, out, backend=None, temperature=0.0, overwrite=False):
    from treg_lightning.data.datamodule import PreferenceDataModule
    from treg_lightning.module import PreferenceModule

    module = PreferenceModule(str(model_dir))
    datamodule = PreferenceDataModule(
        str(data), tokenizer=str(model_dir), max_length=96, max_prompt_length=64, rewards=None
    )
    trainer = TRegTrainer(accelerator="cpu", devices=1, logger=False)
    sampling = SamplingSettings(max_new_tokens=5, temperature=temperature, seed=1)
    generation = GenerationSettings(batch_size=1, shard_size=2, progress=False)
    settings = PredictSettings(Output(str(out), overwrite), generation, sampling)
    answers = AnswerJob(module, datamodule, None, None, "train", 7,
                        backend or TransformersBackend())  # fmt: skip
    return run_predict(trainer, PredictJob(answers, settings))


def test_resume_keeps_finished_shards_and_never_mixes_settings(setup, tiny_model_dir):
    root, data = setup["root"], setup["data"]
    straight = predict_direct(tiny_model_dir, data, root / "straight.jsonl")
    out = root / "resumed.jsonl"
    with pytest.raises(KeyboardInterrupt):
        predict_direct(tiny_model_dir, data, out, backend=FailAfter(3))  # shard 0 done, 1 half
    (parts,) = Path(f"{out}.parts").iterdir()
    assert sorted(p.name for p in parts.glob("shard-*")) == ["shard-000000.jsonl"]
    assert json.loads((parts / "settings.json").read_text())["prompts"]["count"] == 7
    stamp = (parts / "shard-000000.jsonl").stat().st_mtime_ns
    # Other settings (sampling) must not reuse the finished shard: a fresh parts folder.
    with pytest.raises(KeyboardInterrupt):
        predict_direct(tiny_model_dir, data, out, temperature=1.0, backend=FailAfter(1))
    assert len(list(Path(f"{out}.parts").iterdir())) == 2  # both unfinished sets kept
    with pytest.raises(KeyboardInterrupt):  # 2 of 7 prompts done: 5 batches of 1 are left
        predict_direct(tiny_model_dir, data, out, backend=FailAfter(4))
    assert (parts / "shard-000000.jsonl").stat().st_mtime_ns == stamp  # kept, not redone
    predict_direct(tiny_model_dir, data, out, backend=FailAfter(1))  # shard 3 (1 prompt) left
    assert not parts.exists()  # merged and cleaned up; the other settings' parts remain
    assert len(list(Path(f"{out}.parts").iterdir())) == 1
    assert read(out) == read(straight) and len(read(out)) == 7


# --- subprocesses: kill -9 and two DDP processes --------------------------------------------


def start(args: list[str], tmp_path: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{tmp_path}", "OMP_NUM_THREADS": "1"}
    for key in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_PORT"):
        env.pop(key, None)
    command = [sys.executable, "-m", "treg_lightning.cli.main", "predict", *args]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)  # fmt: skip


def test_sigkill_then_resume_gives_the_same_file(setup, tiny_model_dir, tmp_path, single):
    """kill -9 once 2 of 3 shards are written; the rerun generates the third and writes the
    file a straight run writes (batch_size 1 here, 2 there: padding changes no answer)."""
    write_pause_kit(tmp_path)
    args = base_args(tiny_model_dir, setup["data"], tmp_path / "out.jsonl")
    args += [f"--prompts.file={setup['prompts']}", "--generation.shard_size=1",
             "--generation.batch_size=1"]  # fmt: skip
    marker = tmp_path / "paused"
    killed = start(
        [*args, "--backend=pausekit.PauseAfter", "--backend.calls=2", f"--backend.marker={marker}"],
        tmp_path,
    )
    deadline = time.monotonic() + 120
    while not marker.exists():
        assert killed.poll() is None, killed.communicate()[0][-3000:]
        assert time.monotonic() < deadline, "predict never reached the pause"
        time.sleep(0.1)
    os.killpg(killed.pid, signal.SIGKILL)
    assert killed.wait() == -signal.SIGKILL
    (parts,) = Path(f"{tmp_path / 'out.jsonl'}.parts").iterdir()
    shards = sorted(parts.glob("shard-*.jsonl"))
    assert [p.name for p in shards] == ["shard-000000.jsonl", "shard-000001.jsonl"]
    assert not list(parts.glob(".*tmp*"))  # no half-written file
    cli_main(["predict", *args, "--backend=treg_lightning.answers.generation.TransformersBackend"])
    assert (tmp_path / "out.jsonl").read_bytes() == single.read_bytes()


def test_two_ddp_processes_merge_in_prompt_order(setup, tiny_model_dir, tmp_path, single):
    """Shards 0 and 2 on rank 0, shard 1 on rank 1; rank 0 merges them in prompt order."""
    args = base_args(tiny_model_dir, setup["data"], tmp_path / "ddp.jsonl")
    args += [f"--prompts.file={setup['prompts']}", "--generation.shard_size=1"]
    process = start([*args, "--trainer.devices=2", "--trainer.strategy=ddp"], tmp_path)
    try:
        log = process.communicate(timeout=180)[0]
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        pytest.fail(f"2-process predict hung:\n{process.communicate()[0][-3000:]}")
    assert process.returncode == 0, log[-3000:]
    assert (tmp_path / "ddp.jsonl").read_bytes() == single.read_bytes()
    assert len(read(single)) == 3


FAILKIT = '''
import atexit, os, time
from pathlib import Path
import torch.distributed as dist
from treg_lightning.answers.generation import TransformersBackend

class FailOnRank1(TransformersBackend):
    """Rank 1 raises at its first batch (after writing the time to `marker`), then stays alive,
    connections open, until rank 0 (its parent under Lightning's launcher) has exited: NCCL
    tells no rank that another has died, so a dead NCCL rank looks like this to its peers."""

    def __init__(self, marker: str = "failed-at"):
        super().__init__()
        self.marker = marker

    def generate(self, prompt_ids, sampling, key):
        if dist.get_rank() == 1:
            atexit.register(linger, os.getppid())
            Path(self.marker).write_text(repr(time.time()))
            raise RuntimeError("boom while generating on rank 1")
        return super().generate(prompt_ids, sampling, key)

def linger(parent):
    deadline = time.monotonic() + 300
    while os.getppid() == parent and time.monotonic() < deadline:
        time.sleep(0.2)
'''


@pytest.mark.gpu_emulation
def test_a_failing_rank_ends_both_ddp_processes_with_its_error(setup, tiny_model_dir, tmp_path):
    """Rank 1 raises while generating its shard; rank 0 (done with its shards, waiting for the
    merge) must stop within seconds naming that error, not wait for the process group's
    30-minute timeout; then rank 1 ends too."""
    (tmp_path / "failkit.py").write_text(FAILKIT)
    marker = tmp_path / "failed-at"
    args = base_args(tiny_model_dir, setup["data"], tmp_path / "ddp.jsonl")
    args += [f"--prompts.file={setup['prompts']}", "--generation.shard_size=1",
             "--trainer.devices=2", "--trainer.strategy=ddp", "--backend=failkit.FailOnRank1",
             f"--backend.marker={marker}"]  # fmt: skip
    process = start(args, tmp_path)
    try:  # stdout reaches its end when both ranks (they share it) have exited
        log = process.communicate(timeout=240)[0]
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        pytest.fail(f"2-process predict hung:\n{process.communicate()[0][-3000:]}")
    ended = time.time()
    assert marker.exists(), log[-3000:]
    assert ended - float(marker.read_text()) < 60, log[-3000:]
    assert process.returncode == 1, log[-3000:]
    expected = "rank 1 failed at predict-shards with RuntimeError: boom while generating on rank 1"
    assert expected in log, log[-3000:]
    assert not (tmp_path / "ddp.jsonl").exists()


def _treg_status(args: list[str], capsys) -> tuple[int, str]:
    """`treg ARGS` in-process through the console entry point: (exit status, stderr)."""
    from treg_lightning.cli.main import cli_main as treg_main

    with mock.patch.object(sys, "argv", ["treg"]), pytest.raises(SystemExit) as info:
        treg_main(args)
    return info.value.code, capsys.readouterr().err


@pytest.mark.parametrize("limit", [0, -1])
def test_predict_limit_below_one_is_refused_at_start_up(setup, tiny_model_dir, limit, capsys):
    from builders import no_model_load

    out = setup["root"] / f"limit{limit}.jsonl"
    with no_model_load("treg_lightning.answers.prompt_sets.load_prompt_set"):
        args = ["predict", *base_args(tiny_model_dir, setup["data"], out)]
        status, err = _treg_status([*args, f"--prompts.limit={limit}"], capsys)
    assert status == 2
    want = "predict needs at least one prompt (--prompts.limit N with N >= 1)"
    assert f"error: --prompts.limit {limit}: {want}" in err
    assert "Traceback" not in err and not out.exists()


def test_vllm_backend_without_vllm_is_refused_at_start_up(setup, tiny_model_dir, capsys):
    from builders import no_model_load

    out = setup["root"] / "vllm.jsonl"
    args = [*base_args(tiny_model_dir, setup["data"], out),
            "--backend=treg_lightning.answers.generation.VLLMBackend"]  # fmt: skip
    import importlib.util

    real = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):  # vLLM is not installed, whatever this machine has
        return None if name == "vllm" else real(name, *args, **kwargs)

    with (
        mock.patch("importlib.util.find_spec", find_spec),
        no_model_load("treg_lightning.answers.prompt_sets.load_prompt_set"),
    ):
        status, err = _treg_status(["predict", *args], capsys)
    assert status == 2
    assert (
        "error: --backend treg_lightning.answers.generation.VLLMBackend needs vLLM, which is not "
        in err
    )
    assert "drop --backend to generate with the default" in err
    assert "Traceback" not in err and not out.exists()


FORMAT_PROMPTS = [
    "Say hi.",
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Why, é?"}],
    {"instruction": "Translate.", "input": "chat", "dataset": "mine"},
]
FORMAT_LAST_TURNS = ["Say hi.", "Why, é?", "Translate.\n\nchat"]


def _write_prompts(path: Path, kind: str) -> Path:
    """FORMAT_PROMPTS as a prompts file of ``kind`` (tables: one object per row)."""
    import gzip

    import pyarrow as pa
    import pyarrow.parquet as pq

    if kind in ("jsonl", "jsonl.gz"):
        data = "".join(json.dumps(v) + "\n" for v in FORMAT_PROMPTS).encode()
        path.write_bytes(gzip.compress(data) if kind.endswith(".gz") else data)
    elif kind == "json":
        path.write_text(json.dumps(FORMAT_PROMPTS, indent=1))
    elif kind == "csv":
        import csv

        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, ["prompt", "instruction", "input", "dataset"])
            writer.writeheader()
            writer.writerow({"prompt": FORMAT_PROMPTS[0]})
            writer.writerow({"prompt": repr(FORMAT_PROMPTS[1])})  # a message list as text
            writer.writerow(FORMAT_PROMPTS[2])
    elif kind == "parquet":
        rows = [{"messages": [{"role": "user", "content": FORMAT_PROMPTS[0]}]},
                {"messages": FORMAT_PROMPTS[1]},
                {"messages": [{"role": "user", "content": "Translate.\n\nchat"}]}]  # fmt: skip
        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.mark.parametrize("kind", ["jsonl", "jsonl.gz", "json", "csv", "parquet"])
def test_prompts_file_in_every_data_format(tmp_path, kind):
    """The same three prompts from a .jsonl, .jsonl.gz, .json list, .csv (a message list as
    text in a cell) and .parquet file: the same messages, in file order."""
    prompts = read_prompts_file(_write_prompts(tmp_path / f"prompts.{kind}", kind))
    assert [p["messages"][-1]["content"] for p in prompts] == FORMAT_LAST_TURNS
    assert prompts[1]["messages"][0] == {"role": "system", "content": "Be brief."}


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        (
            "latin1.jsonl",
            '"ok"\n"caf\xe9"\n'.encode("latin1"),
            r"latin1\.jsonl line 2: not valid UTF-8 \(byte 0xe9 at offset 9\)\. Convert the file",
        ),
        ("broken.json", b'[\n "ok",\n "cut', r"broken\.json line 3: invalid JSON \(Unterminated"),
        (
            "object.json",
            b'{"prompt": "x"}',
            r"object\.json: a \.json prompts file must hold a list",
        ),
        ("cut.jsonl.gz", b"\x1f\x8b\x08\x00\x00", r"cut\.jsonl\.gz: the gzip file is truncated"),
        ("bad.parquet", b"PAR1 not parquet", r"bad\.parquet: cannot read the parquet file"),
        ("empty-row.csv", b'prompt\nok\n"  "\n', r"empty-row\.csv row 1, field 'prompt': empty"),
        ("no-field.csv", b"question\nwhy\n", r"no-field\.csv row 0: a prompt object needs one of"),
        ("prompts.txt", b"Say hi.\n", r"prompts\.txt: unsupported prompts file type '\.txt'"),
    ],
)
def test_prompts_file_errors_name_the_file_and_row(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataFormatError, match=message) as info:
        read_prompts_file(path)
    assert str(path) in str(info.value)
