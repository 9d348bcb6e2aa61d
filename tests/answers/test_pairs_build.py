"""`treg pairs`: per-seed samples equal `treg predict`'s, batched scores equal one-by-one scores
(and the implicit reward equals a hand computation), the selection against a hand-made score
table, kill -9 / a crash in scoring then rerun = an uninterrupted run, the pairs train with
`treg fit` as they are, and bad input refused before any model loads."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

import pytest
import torch

from builders import (
    NO_SYSTEM,
    answer_args,
    byte_tokenizer,
    checkout_env,
    no_model_load,
    save_tiny_model,
    tiny_fit_args,
    write_pairs,
    write_pause_kit,
)
from treg_lightning.answers.scorers import ImplicitRewardScorer, SequenceClassifierScorer
from treg_lightning.answers.selection import BestWorst, Sample
from treg_lightning.cli.main import TRegCLI
from treg_lightning.cli.main import cli_main as treg_main
from treg_lightning.errors import ConfigError
from treg_lightning.outputs import OutputFolderError

PROMPTS = [
    "Say hi.",
    {"prompt": "Count to 3.", "dataset": "mine"},
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Why?"}],
    "Name a color.",
    "Say hi.",  # a repeat: sampled once
]
SEEDS = ["--pairs.k=3"]  # 13, 21, 42
# Float32 scores through two code paths (batched / alone): a few float32 ulps of the value.
TOL = 64 * torch.finfo(torch.float32).eps


def cli(args: list[str]) -> TRegCLI:
    with mock.patch.object(sys, "argv", ["treg"]):
        return TRegCLI(args=args)


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def outputs(out: Path) -> dict[str, bytes]:
    stem = out.name[: -len(out.suffix)]
    names = [out.name, f"{stem}.samples.jsonl", f"{stem}.summary.json"]
    return {name: (out.parent / name).read_bytes() for name in names}


@pytest.fixture(scope="module")
def env(tiny_model_dir, tmp_path_factory):
    """A judge policy (other random weights, same tokenizer), a judge whose template refuses
    system messages, reward models with one and two outputs, a prompts file, a pairs file."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    root = tmp_path_factory.mktemp("pairs")
    judge = save_tiny_model(root / "judge", seed=1)
    no_system = save_tiny_model(root / "no_system", byte_tokenizer(NO_SYSTEM), seed=1)
    tokenizer = byte_tokenizer()
    rms = {}
    for labels in (1, 2):
        torch.manual_seed(3)
        config = LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, num_labels=labels,
            pad_token_id=tokenizer.pad_token_id,
        )  # fmt: skip
        rms[labels] = root / f"rm{labels}"
        LlamaForSequenceClassification(config).save_pretrained(rms[labels])
        tokenizer.save_pretrained(rms[labels])
    prompts = root / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps(p) for p in PROMPTS) + "\n")
    data = write_pairs(root / "data.jsonl", 6)
    return {"root": root, "judge": judge, "no_system": no_system, "rm1": rms[1], "rm2": rms[2],
            "prompts": prompts, "data": data}  # fmt: skip


def pairs_args(model: Path, env: dict, out: Path, *extra: str) -> list[str]:
    return [
        "pairs",
        *answer_args(model, env["data"], env["prompts"], out),
        *SEEDS,
        "--sampling.max_new_tokens=8",
        "--sampling.temperature=1.0",
        "--sampling.top_p=0.95",
        "--generation.batch_size=1",
        "--generation.shard_size=1",
        "--generation.progress=false",
        "--scorer=treg_lightning.answers.scorers.ImplicitRewardScorer",
        f"--scorer.policy={env['judge']}",
        f"--scorer.reference={model}",
        "--scorer.max_length=128",
        *extra,
    ]


@pytest.fixture(scope="module")
def straight(env, tiny_model_dir):
    """An uninterrupted run: 4 distinct prompts x 3 seeds, one prompt a shard."""
    out = env["root"] / "straight.jsonl"
    cli(pairs_args(tiny_model_dir, env, out))
    return out


# --- sampling -------------------------------------------------------------------------------


def test_outputs_and_samples_per_seed_equal_predict(env, tiny_model_dir, straight):
    samples = read(straight.with_name("straight.samples.jsonl"))
    assert len(samples) == 4 * 3  # the repeated prompt once
    assert [s["seed"] for s in samples[:3]] == [13, 21, 42]
    assert len({s["fingerprint"] for s in samples}) == 1
    pairs = read(straight)
    summary = json.loads(straight.with_name("straight.summary.json").read_text())
    assert summary["kept"] == len(pairs) and summary["prompts"] == 4
    assert summary["kept"] + sum(summary["dropped"].values()) == 4
    assert not Path(f"{straight}.parts").exists()
    for pair in pairs:
        mine = [s for s in samples if s["prompt_index"] == pair["prompt_index"]]
        by_role = {s["role"]: s for s in mine}
        assert pair["chosen"] == [{"role": "assistant", "content": by_role["chosen"]["output"]}]
        assert pair["rejected"][0]["content"] == by_role["rejected"]["output"]
        assert pair["chosen_score"] == max(s["score"] for s in mine)
        assert pair["rejected_score"] == min(s["score"] for s in mine)
    assert pairs[2]["prompt"][0] == {"role": "system", "content": "Be brief."}
    assert pairs[1]["dataset"] == "mine"
    # Seed 13's samples are the answers `treg predict --sampling.seed 13` gives with the same
    # batching.
    predicted = env["root"] / "seed13.jsonl"
    cli(["predict", *pairs_args(tiny_model_dir, env, predicted)[1:8],
         f"--output.path={predicted}", "--sampling.seed=13", "--sampling.max_new_tokens=8",
         "--sampling.temperature=1.0", "--sampling.top_p=0.95", "--generation.batch_size=1",
         "--generation.shard_size=1", "--generation.progress=false"])  # fmt: skip
    answers = [r["output"] for r in read(predicted)]
    assert answers[:4] == [s["output"] for s in samples if s["seed"] == 13]
    # The same seeds in another order and number give the same sample per seed.
    other = env["root"] / "other.jsonl"
    cli([*pairs_args(tiny_model_dir, env, other), "--pairs.seeds=[42, 13]", "--pairs.k=null"])
    again = read(other.with_name("other.samples.jsonl"))
    for seed in (13, 42):
        assert [s["output"] for s in again if s["seed"] == seed] == [
            s["output"] for s in samples if s["seed"] == seed
        ]


# --- scorers --------------------------------------------------------------------------------

ITEMS = [
    ([{"role": "user", "content": "Say hi."}], "Hello there!"),
    ([{"role": "user", "content": "Count to 3, slowly please."}], "1"),
    (
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Why?"}],
        "Because the sky scatters blue light more than red light.",
    ),  # fmt: skip
    ([{"role": "user", "content": "Name a color."}], "Red."),
    ([{"role": "user", "content": "Say hi."}], "Hi."),
]


def close(a: list[float], b: list[float]) -> bool:
    return all(math.isclose(x, y, rel_tol=TOL, abs_tol=TOL) for x, y in zip(a, b, strict=True))


def test_implicit_reward_batched_equals_alone_and_a_hand_computation(env, tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    scorer = ImplicitRewardScorer(str(env["judge"]), str(tiny_model_dir), beta=2.0,
                                  length_normalized=True, batch_size=3)  # fmt: skip
    scorer.setup(torch.device("cpu"))
    batched = scorer.score(ITEMS)
    alone = [scorer.score([item])[0] for item in ITEMS]
    assert close(batched, alone)
    # By hand: the chat template + answer + end-of-turn, log_softmax of full logits.
    tokenizer = AutoTokenizer.from_pretrained(env["judge"])
    messages, answer = ITEMS[2]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    prompt = tokenizer(text, add_special_tokens=False)["input_ids"]
    response = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids = torch.tensor([prompt + response])
    sums = []
    for folder in (env["judge"], tiny_model_dir):
        model = AutoModelForCausalLM.from_pretrained(folder).eval()
        with torch.no_grad():
            logps = model(ids).logits.double().log_softmax(-1)[0]
        sums.append(sum(float(logps[t - 1, ids[0, t]]) for t in range(len(prompt), ids.shape[1])))
    expected = 2.0 * (sums[0] - sums[1]) / len(response)
    assert math.isclose(batched[2], expected, rel_tol=TOL, abs_tol=TOL)
    unnormalized = ImplicitRewardScorer(str(env["judge"]), str(tiny_model_dir), beta=2.0,
                                        length_normalized=False)  # fmt: skip
    unnormalized.setup(torch.device("cpu"))
    assert math.isclose(unnormalized.score([ITEMS[2]])[0], expected * len(response),
                        rel_tol=TOL, abs_tol=TOL)  # fmt: skip


def test_reward_model_batched_equals_alone_and_output_field(env):
    scorer = SequenceClassifierScorer(str(env["rm1"]), batch_size=3)
    scorer.check([m for m, _ in ITEMS])
    scorer.setup(torch.device("cpu"))
    batched = scorer.score(ITEMS)
    assert close(batched, [scorer.score([item])[0] for item in ITEMS])
    named = SequenceClassifierScorer(str(env["rm1"]), output_field="logits", batch_size=2)
    named.setup(torch.device("cpu"))
    assert close(named.score(ITEMS), batched)
    two = SequenceClassifierScorer(str(env["rm2"]), output_field="logits")
    two.setup(torch.device("cpu"))
    with pytest.raises(ConfigError, match="not one value per conversation"):
        two.score(ITEMS[:2])


# --- selection ------------------------------------------------------------------------------


def choose(rule: BestWorst, table: list[tuple[str, float | None]]):
    return rule.select([Sample(i, text, score) for i, (text, score) in enumerate(table)])


def test_selection_against_a_hand_made_table():
    rule = BestWorst()
    assert choose(rule, [("a", 0.1), ("b", 0.7), ("c", -0.2)]) == choose(
        rule, [("a", 0.1), ("b", 0.7), ("c", -0.2)]
    )
    got = choose(rule, [("a", 0.1), ("b", 0.7), ("c", -0.2)])
    assert (got.chosen, got.rejected, got.dropped) == (1, 2, None)
    # Ties for the best and for the worst: the first in seed order wins each.
    got = choose(rule, [("a", 0.5), ("b", -1.0), ("c", 0.5), ("d", -1.0)])
    assert (got.chosen, got.rejected) == (0, 1)
    # Identical answers (scored once, so tied): dropped as identical, not as tied.
    assert choose(rule, [("same", 0.3), ("same", 0.3), ("same", 0.3)]).dropped == "identical"
    assert choose(rule, [("x", 0.3), ("y", 0.3), ("z", 0.3)]).dropped == "tied"
    # Too few after failures: an empty answer and a non-finite score do not count.
    assert choose(rule, [("", None), ("b", 0.2), ("c", float("nan"))]).dropped == "too_few"
    got = choose(rule, [("", None), ("b", 0.2), ("c", 0.9)])
    assert (got.chosen, got.rejected) == (2, 1)
    assert choose(BestWorst(min_samples=3), [("", None), ("b", 0.2), ("c", 0.9)]).dropped == (
        "too_few"
    )
    # Margin threshold: best - worst = 0.5 passes at 0.5 and fails at 0.6.
    table = [("a", 0.25), ("b", 0.75), ("c", 0.5)]
    got = choose(BestWorst(min_margin=0.5), table)
    assert (got.chosen, got.rejected) == (1, 0)
    assert choose(BestWorst(min_margin=0.6), table).dropped == "margin"
    with pytest.raises(ConfigError, match="min_samples"):
        BestWorst(min_samples=1)


# --- resume ---------------------------------------------------------------------------------


def test_sigkill_while_sampling_then_rerun_gives_the_same_files(env, tiny_model_dir, straight,
                                                                tmp_path):  # fmt: skip
    """kill -9 in seed 21's samples (seed 13 done); the rerun writes the uninterrupted files."""
    write_pause_kit(tmp_path)
    out = tmp_path / "straight.jsonl"  # same name: the sidecars must be byte-equal too
    args = pairs_args(tiny_model_dir, env, out)
    marker = tmp_path / "paused"
    backend = ["--backend=pausekit.PauseAfter", "--backend.calls=6", f"--backend.marker={marker}"]
    command = [sys.executable, "-m", "treg_lightning.cli.main", *args, *backend]
    environment = checkout_env(tmp_path, OMP_NUM_THREADS="1")
    for key in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_PORT"):
        environment.pop(key, None)
    killed = subprocess.Popen(
        command, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )  # fmt: skip
    deadline = time.monotonic() + 180
    while not marker.exists():
        assert killed.poll() is None, killed.communicate()[0][-3000:]
        assert time.monotonic() < deadline, "pairs never reached the pause"
        time.sleep(0.1)
    os.killpg(killed.pid, signal.SIGKILL)
    assert killed.wait() == -signal.SIGKILL
    (parts,) = Path(f"{out}.parts").iterdir()
    assert len(list((parts / "samples-seed13").glob("shard-*.jsonl"))) == 4
    assert len(list((parts / "samples-seed21").glob("shard-*.jsonl"))) == 2
    assert not list(parts.rglob(".*tmp*"))  # no half-written file
    assert not out.exists()
    cli(args)
    assert outputs(out) == outputs(straight)


def test_crash_while_scoring_then_rerun_reuses_the_scored_shards(env, tiny_model_dir, straight,
                                                                 tmp_path):  # fmt: skip
    out = tmp_path / "straight.jsonl"
    real, calls = ImplicitRewardScorer.score, []

    def flaky(self, items):
        calls.append(len(items))
        if len(calls) == 3:
            raise KeyboardInterrupt("stopped while scoring")
        return real(self, items)

    with mock.patch.object(ImplicitRewardScorer, "score", flaky), pytest.raises(KeyboardInterrupt):
        cli(pairs_args(tiny_model_dir, env, out))
    (parts,) = Path(f"{out}.parts").iterdir()
    (scores,) = parts.glob("scores-*")
    done = sorted(p.name for p in scores.glob("shard-*.jsonl"))
    assert done == ["shard-000000.jsonl", "shard-000001.jsonl"]
    stamp = (scores / done[0]).stat().st_mtime_ns
    calls.clear()

    def counted(self, items):
        calls.append(len(items))
        assert (scores / done[0]).stat().st_mtime_ns == stamp  # kept, not redone
        return real(self, items)

    sampled_again = AssertionError("sampled again")
    with (
        mock.patch("treg_lightning.answers.generation.TransformersBackend.generate",
                   side_effect=sampled_again),
        mock.patch.object(ImplicitRewardScorer, "score", counted),
    ):  # fmt: skip
        cli(pairs_args(tiny_model_dir, env, out))
    assert len(calls) == 2  # the two unscored shards only
    assert outputs(out) == outputs(straight)


# --- the output trains; outputs are never overwritten -----------------------------------------


def test_pairs_train_with_fit_and_are_never_overwritten(env, tiny_model_dir, straight, tmp_path):
    pairs = read(straight)
    assert len(pairs) >= 2
    cli(["fit", *tiny_fit_args(tiny_model_dir, straight, tmp_path, max_steps=2)])
    with pytest.raises(OutputFolderError, match="--output.overwrite"):
        cli(pairs_args(tiny_model_dir, env, straight))
    stem = tmp_path / "fresh.jsonl"
    (tmp_path / "fresh.samples.jsonl").write_text('{"fingerprint": "another run"}\n')
    with no_model_load(), pytest.raises(OutputFolderError, match="another run"):
        cli(pairs_args(tiny_model_dir, env, stem))


# --- bad input: exit 2 before any model loads ---------------------------------------------------


def refused(args: list[str], capsys) -> str:
    with (
        no_model_load("transformers.AutoModelForSequenceClassification.from_pretrained"),
        mock.patch.object(sys, "argv", ["treg"]),
        pytest.raises(SystemExit) as info,
    ):
        treg_main(args)
    err = capsys.readouterr().err
    assert info.value.code == 2 and "Traceback" not in err, err[-2000:]
    return err


def test_bad_inputs_are_refused_before_any_model_loads(env, tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "out.jsonl"
    args = pairs_args(tiny_model_dir, env, out)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    assert "holds no prompt" in refused([*args, f"--prompts.file={empty}"], capsys)
    want = "--prompts.limit 0: pairs needs at least one prompt"
    assert want in refused([*args, "--prompts.limit=0"], capsys)
    assert "--pairs.k 1: pairs needs k >= 2" in refused([*args, "--pairs.k=1"], capsys)
    assert "k >= 2" in refused([*args, "--pairs.seeds=[5]", "--pairs.k=null"], capsys)
    rm = ["--scorer=treg_lightning.answers.scorers.SequenceClassifierScorer",
          f"--scorer.name_or_path={env['rm2']}"]  # fmt: skip
    err = refused([*args[:-4], *rm], capsys)
    assert "2 outputs" in err and "output_field" in err
    judge = [f"--scorer.policy={env['no_system']}"]
    err = refused([*args, *judge], capsys)
    assert "cannot render prompt 2" in err and "System role not supported" in err
    assert not out.exists() and not Path(f"{out}.parts").exists()


def test_shipped_onpolicy_config_parses(monkeypatch):
    import contextlib
    import io

    import yaml

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config = Path(__file__).resolve().parents[2] / "configs" / "onpolicy_demo.yaml"
    out = io.StringIO()
    with (
        mock.patch.object(sys, "argv", ["treg"]),
        contextlib.redirect_stdout(out),
        pytest.raises(SystemExit) as info,
    ):
        treg_main(["pairs", "--config", str(config), "--print_config"])
    assert info.value.code in (0, None)
    printed = yaml.safe_load(out.getvalue())
    assert printed["scorer"]["class_path"] == "treg_lightning.answers.scorers.ImplicitRewardScorer"
    assert printed["pairs"]["seeds"] == [13, 21, 42, 79] and printed["model"]["model"] == "smollm2"
