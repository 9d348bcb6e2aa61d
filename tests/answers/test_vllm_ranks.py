"""VLLMBackend on several processes, emulated on CPU: two gloo ranks run `treg predict --backend
treg_lightning.answers.generation.VLLMBackend` against a stand-in `vllm` package (put on the
path of the processes) that records how each engine is built and answers deterministically.

What vLLM needs under a torchrun-style launcher (vllm/v1/executor/uniproc_executor.py
`ExecutorWithExternalLauncher`: RANK and LOCAL_RANK read from the environment, the worker on
`cuda:<LOCAL_RANK>`, the engine in-process; vllm/distributed/parallel_state.py: the engine's
groups are built on the launcher's process group, every rank taking part; TRL's colocate mode
builds its engines the same way): each rank's engine gets its own device setting and seed, the
checkpoint is exported once (rank 0) for both engines, a rank with no shard still builds its
engine (a collective), and the merged answers are complete and in prompt order."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from unittest import mock

import pytest
import torch

from builders import SRC, answer_args, write_pairs
from treg_lightning.answers.generation import (
    VLLMBackend,
    engine_local_rank,
    environment,
    launcher_environment,
)
from treg_lightning.errors import ConfigError

pytestmark = pytest.mark.gpu_emulation

FAKE_VLLM = '''
"""A stand-in for vLLM (tests only): records each engine's construction, answers "Re: <the
last user turn>" and joins the process group as vLLM's external_launcher engines do."""
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import AutoTokenizer


def _record(entry):
    with open(os.environ["FAKE_VLLM_LOG"], "a") as log:
        log.write(json.dumps(entry) + "\\n")


class SamplingParams:
    def __init__(self, **kwargs):
        self.kwargs = kwargs


class _Completion:
    def __init__(self, token_ids, finish_reason):
        self.token_ids, self.finish_reason = token_ids, finish_reason


class _Output:
    def __init__(self, completion):
        self.outputs = [completion]


class LLM:
    def __init__(self, model, tokenizer=None, **kwargs):
        env = {k: os.environ.get(k) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR",
               "MASTER_PORT", "CUDA_VISIBLE_DEVICES", "VLLM_ENABLE_V1_MULTIPROCESSING")}
        joined = None
        if kwargs.get("distributed_executor_backend") == "external_launcher":
            # ExecutorWithExternalLauncher: asserts the engine runs in-process, reads the ranks.
            assert env["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
            rank, local = int(env["RANK"]), int(env["LOCAL_RANK"])
            if dist.is_initialized():  # its groups and the memory minimum: collectives
                free = torch.tensor([1000 + rank])
                dist.all_reduce(free, op=dist.ReduceOp.MIN)
                joined = [dist.get_rank(), dist.get_world_size(), int(free)]
        config = (Path(model) / "config.json").stat()
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer or model)
        self.pid = os.getpid()
        _record({"event": "engine", "pid": self.pid, "env": env, "joined": joined,
                 "model": str(model), "kwargs": kwargs,
                 "config": [config.st_ino, config.st_mtime_ns]})

    def generate(self, prompts, params, use_tqdm=True):
        outputs = []
        for prompt in prompts:
            text = self.tokenizer.decode(prompt["prompt_token_ids"])
            user = text.rsplit("<|user|>", 1)[1].split("<|end|>", 1)[0]
            ids = self.tokenizer("Re: " + user, add_special_tokens=False)["input_ids"]
            outputs.append(_Output(_Completion(ids + [self.tokenizer.eos_token_id], "stop")))
        _record({"event": "generate", "pid": self.pid, "prompts": len(prompts),
                 "params": params.kwargs})
        return outputs
'''
PROMPTS = ["Say hi.", "Count to 3.", "Why?"]


@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_model_dir):
    """The stand-in package, a prompts file and a `.ckpt` of the tiny policy (so vLLM's folder
    is an export)."""
    root = tmp_path_factory.mktemp("vllm-ranks")
    (root / "fake" / "vllm").mkdir(parents=True)
    (root / "fake" / "vllm" / "__init__.py").write_text(textwrap.dedent(FAKE_VLLM))
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    ckpt = root / "run.ckpt"
    torch.save({"state_dict": {f"policy.{k}": v for k, v in model.state_dict().items()}}, ckpt)
    return {"root": root, "fake": root / "fake", "prompts": prompts, "ckpt": ckpt,
            "data": write_pairs(root / "data.jsonl", 6)}  # fmt: skip


def args(env, model, out: Path, *extra: str) -> list[str]:
    return [
        "predict",
        *answer_args(model, env["data"], env["prompts"], out),
        f"--ckpt_path={env['ckpt']}",
        "--sampling.max_new_tokens=16",
        "--generation.shard_size=1",
        "--generation.progress=false",
        "--backend=treg_lightning.answers.generation.VLLMBackend",
        *extra,
    ]


def two_ranks(env, model, out: Path, *extra: str) -> list[dict]:
    """`treg predict` on 2 gloo processes with the stand-in; the stand-in's records."""
    log = out.with_suffix(".log")
    variables = {**os.environ, "FAKE_VLLM_LOG": str(log), "OMP_NUM_THREADS": "1",
                 "PYTHONPATH": os.pathsep.join([str(SRC), str(env["fake"])])}  # fmt: skip
    for key in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_PORT", "RANK",
                "CUDA_VISIBLE_DEVICES"):  # fmt: skip
        variables.pop(key, None)
    command = [
        sys.executable,
        "-m",
        "treg_lightning.cli.main",
        *args(env, model, out, "--trainer.devices=2", "--trainer.strategy=ddp", *extra),
    ]
    process = subprocess.Popen(
        command,
        env=variables,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output = process.communicate(timeout=300)[0]
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        pytest.fail(f"2-process predict with vLLM hung:\n{process.communicate()[0][-3000:]}")
    assert process.returncode == 0, output[-3000:]
    return [json.loads(line) for line in log.read_text().splitlines()]


def test_each_rank_runs_its_own_engine_on_an_export_written_once(env, tiny_model_dir):
    out = env["root"] / "answers.jsonl"
    records = two_ranks(env, tiny_model_dir, out)
    engines = [r for r in records if r["event"] == "engine"]
    assert len(engines) == 2 and len({e["pid"] for e in engines}) == 2
    by_rank = {int(e["env"]["RANK"]): e for e in engines}
    assert sorted(by_rank) == [0, 1]
    for rank, engine in by_rank.items():
        # Its own device setting (cuda:<LOCAL_RANK> in vLLM's worker), seed and group place.
        assert engine["env"]["LOCAL_RANK"] == str(rank) and engine["env"]["WORLD_SIZE"] == "2"
        assert engine["env"]["CUDA_VISIBLE_DEVICES"] is None  # left as the launcher set it
        assert engine["joined"] == [rank, 2, 1000]
        assert engine["kwargs"] == {
            "gpu_memory_utilization": 0.85, "tensor_parallel_size": 1, "dtype": "auto",
            "enforce_eager": False, "distributed_executor_backend": "external_launcher",
            "seed": rank,
        }  # fmt: skip
    # One export, into the run's work folder, read by both engines (two writers would have
    # renamed two folders into place: two inodes).
    (model,) = {e["model"] for e in engines}
    assert Path(model).name == "policy" and Path(model).parent.parent.name == f"{out.name}.parts"
    assert by_rank[0]["config"] == by_rank[1]["config"]
    assert not Path(f"{out}.parts").exists()  # the export went with the parts
    # Shards 0 and 2 on rank 0, shard 1 on rank 1; merged complete and in prompt order.
    calls = [r for r in records if r["event"] == "generate"]
    assert sorted(c["pid"] for c in calls).count(by_rank[0]["pid"]) == 2
    assert [c["pid"] for c in calls].count(by_rank[1]["pid"]) == 1
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["instruction"] for r in rows] == PROMPTS
    assert [r["output"] for r in rows] == [f"Re: {p}" for p in PROMPTS]
    assert [r["finish_reason"] for r in rows] == ["stop"] * 3


def test_a_rank_without_shards_still_builds_its_engine(env, tiny_model_dir):
    """One prompt, one shard (rank 0's): rank 1 must still take part in building the engines,
    or rank 0 waits for it forever."""
    out = env["root"] / "one.jsonl"
    records = two_ranks(env, tiny_model_dir, out, "--prompts.limit=1")
    engines = [r for r in records if r["event"] == "engine"]
    assert sorted(int(e["env"]["RANK"]) for e in engines) == [0, 1]
    assert [json.loads(line)["output"] for line in out.read_text().splitlines()] == ["Re: Say hi."]


def test_tensor_parallel_engines_need_one_process(env, tiny_model_dir, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(env["fake"]))  # vLLM "installed": the check passes
    out = env["root"] / "tp.jsonl"
    from treg_lightning.cli.main import cli_main

    with (
        mock.patch("treg_lightning.answers.prompt_sets.load_prompt_set", side_effect=ValueError),
        mock.patch.object(sys, "argv", ["treg"]),
        pytest.raises(SystemExit) as info,
    ):
        cli_main(args(env, tiny_model_dir, out, "--trainer.devices=2", "--trainer.strategy=ddp",
                      "--backend.tensor_parallel_size=2"))  # fmt: skip
    err = capsys.readouterr().err
    assert info.value.code == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == (
        "error: VLLMBackend(tensor_parallel_size=2) with 2 processes: each process runs its own "
        "engine on its own GPU, with its own prompts, so its engine cannot spread over other "
        "GPUs. Either keep the processes and set --backend.tensor_parallel_size 1, or run one "
        "process (--trainer.devices 1) whose engine spreads over 2 GPUs."
    )
    assert not out.exists() and "vllm" not in sys.modules


def test_device_setting_and_environment_of_one_engine(monkeypatch):
    # vLLM's worker runs on cuda:<LOCAL_RANK>: the device index, not the launcher's local rank
    # (--trainer.devices [2, 3] puts local rank 1 on cuda:3).
    assert engine_local_rank(torch.device("cuda", 3), "1") == 3
    assert engine_local_rank(torch.device("cpu"), "1") == 1
    assert engine_local_rank(torch.device("cpu"), None) == 0
    # One process (no process group): vLLM makes its own env:// group of one.
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.setenv("MASTER_PORT", "29511")
    monkeypatch.setenv("LOCAL_RANK", "7")
    variables = launcher_environment(0, 2, 1, ranked=False)
    assert variables == {"RANK": "0", "LOCAL_RANK": "2", "WORLD_SIZE": "1",
                         "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29511"}  # fmt: skip
    assert set(launcher_environment(1, 1, 2, ranked=True)) == {"RANK", "LOCAL_RANK", "WORLD_SIZE"}
    with environment(variables):
        assert os.environ["LOCAL_RANK"] == "2" and os.environ["RANK"] == "0"
    # Lightning reads LOCAL_RANK again later: the launcher's value comes back.
    assert os.environ["LOCAL_RANK"] == "7" and "RANK" not in os.environ
    with pytest.raises(ConfigError, match="tensor_parallel_size must be >= 1"):
        VLLMBackend(tensor_parallel_size=0)
