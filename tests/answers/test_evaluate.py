"""`treg evaluate` end to end on tiny models: held-out pair metrics against a hand computation
of the DPO implicit reward, length statistics, and the mean reward / win rate of a tiny reward
model built here, against its own one-by-one scores."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch

from builders import CLI_PAIRS, write_pairs
from treg_lightning.answers.evaluation import length_stats, win_rate
from treg_lightning.cli.main import TRegCLI
from treg_lightning.outputs import OutputFolderError

BETA = 0.5
PROMPTS = ["Say hi.", "Count to 3.", "Why is the sky blue?", "Name a fruit."]
# Answer lengths in another order than the run's: a score paired with the wrong prompt shows.
REFERENCE = ["Hello there, and a very good day to you!", "1, 2, 3.", "Rayleigh.", "An apple."]
RUN = ["Hi!", "1, 2, 3.", "It is blue because air scatters blue light most.", "A pear, maybe."]


def cli_main(args: list[str]) -> TRegCLI:
    with mock.patch.object(sys, "argv", ["treg"]):
        return TRegCLI(args=args)


def predictions(path: Path, answers: list[str], finish: list[str]) -> Path:
    rows = []
    for i, (prompt, answer) in enumerate(zip(PROMPTS, answers, strict=True)):
        messages = [{"role": "user", "content": prompt}]
        rows.append({
            "instruction": prompt, "output": answer, "generator": path.stem, "index": i,
            "messages": [*messages, {"role": "assistant", "content": answer}],
            "output_tokens": len(answer), "finish_reason": finish[i],
        })  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def evaluated(tiny_model_dir, tmp_path_factory):
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        LlamaConfig,
        LlamaForSequenceClassification,
    )

    root = tmp_path_factory.mktemp("evaluate")
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    # The trained policy: perturbed tiny weights, as a .ckpt and as an exported folder.
    policy = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    torch.manual_seed(2)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    torch.save({"state_dict": {f"policy.{k}": v for k, v in policy.state_dict().items()}},
               root / "run.ckpt")  # fmt: skip
    policy.save_pretrained(root / "policy")
    tokenizer.save_pretrained(root / "policy")
    # A tiny reward model with the same chat template.
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         num_labels=1, pad_token_id=None)  # fmt: skip
    torch.manual_seed(3)
    reward_model = LlamaForSequenceClassification(config).eval()
    reward_model.save_pretrained(root / "rm")
    tokenizer.save_pretrained(root / "rm")
    # A log folder with CSVLogger's layout.
    log = root / "logs" / "version_0"
    log.mkdir(parents=True)
    (log / "metrics.csv").write_text(
        "epoch,step,train/loss_step,train/reward_accuracy_step,val/loss\n"
        "0,0,0.69,0.5,\n0,1,0.6,1.0,\n0,1,,,0.65\n"
    )
    data = write_pairs(root / "pairs.jsonl", rows=CLI_PAIRS)
    reference = predictions(root / "reference.jsonl", REFERENCE, ["stop"] * 4)
    run = predictions(root / "run.jsonl", RUN, ["stop", "stop", "length", "stop"])
    runs = [
        {"name": "ckpt", "ckpt_path": str(root / "run.ckpt"), "predictions": str(run),
         "log_dir": str(root / "logs")},
        {"name": "folder", "policy": str(root / "policy")},
    ]  # fmt: skip
    args = [
        "evaluate",
        f"--model.model={tiny_model_dir}",
        "--model.loss=treg_lightning.losses.DPOLoss",
        f"--model.loss.beta={BETA}",
        f"--data.source={data}",
        "--data.max_length=64",
        "--data.max_prompt_length=32",
        "--data.val_fraction=0.3",
        f"--data.rewards.cache_dir={root / 'cache'}",
        "--trainer.accelerator=cpu",
        "--trainer.logger=false",
        "--trainer.enable_progress_bar=false",
        f"--trainer.default_root_dir={root}",  # the validation loop saves config.yaml there
        f"--runs={json.dumps(runs)}",
        f"--evaluate.reference={reference}",
        f"--evaluate.reward_model={root / 'rm'}",
        "--evaluate.reward_batch_size=3",
        f"--output.path={root / 'report'}",
    ]
    cli = cli_main(args)
    return {"root": root, "cli": cli, "args": args, "reward_model": reward_model,
            "tokenizer": tokenizer, "policy": policy, "tiny": tiny_model_dir}  # fmt: skip


def results(evaluated) -> dict[str, dict]:
    rows = json.loads((evaluated["root"] / "report" / "evaluation.json").read_text())
    return {row["run"]: row for row in rows}


def test_mean_reward_and_win_rate_against_one_by_one_scores(evaluated):
    model, tokenizer = evaluated["reward_model"], evaluated["tokenizer"]

    def score(prompt: str, answer: str) -> float:
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
        text = tokenizer.apply_chat_template(messages, tokenize=False)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert ids[0] == tokenizer.bos_token_id  # the template writes the one BOS
        with torch.no_grad():
            return float(model(torch.tensor([ids])).logits[0, 0])

    run = [score(p, a) for p, a in zip(PROMPTS, RUN, strict=True)]
    ref = [score(p, a) for p, a in zip(PROMPTS, REFERENCE, strict=True)]
    outcomes = [1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(run, ref, strict=True)]
    assert outcomes[1] == 0.5  # the same answer: a tie, counted half
    p = sum(outcomes) / 4
    half = 1.96 * math.sqrt(sum((o - p) ** 2 for o in outcomes) / 3) / 2  # s / sqrt(n), n = 4
    got = results(evaluated)
    reward = got["ckpt"]["reward"]
    assert reward["mean"] == pytest.approx(sum(run) / 4, abs=1e-5)
    assert reward["win_rate"] == pytest.approx(p)
    assert reward["ci_low"] == pytest.approx(max(0.0, p - half))
    assert reward["ci_high"] == pytest.approx(min(1.0, p + half))
    assert reward["ties"] == 1 and reward["n"] == 4
    assert got["reference"]["reward"]["mean"] == pytest.approx(sum(ref) / 4, abs=1e-5)
    assert "reward" not in got["folder"]  # no predictions for that run


def test_identical_answers_tie_exactly_whatever_their_batch(evaluated):
    """The same conversation in another call, another batch and among other lengths gets the
    very same reward (it is scored once), so it ties with itself in a win rate."""
    from treg_lightning.answers.reward_model import RewardModelScorer

    scorer = RewardModelScorer(str(evaluated["root"] / "rm"), batch_size=3, device="cpu")
    scored: list[int] = []
    score_batch = scorer._score_batch

    def counting(batch):
        scored.extend(len(ids) for ids in batch)
        return score_batch(batch)

    scorer._score_batch = counting

    def conv(prompt, answer):
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]

    first = scorer.score([conv(p, a) for p, a in zip(PROMPTS, RUN, strict=True)])
    twice = [conv(PROMPTS[2], "x " * 30), conv(PROMPTS[1], RUN[1]), conv(PROMPTS[0], RUN[0])]
    second = scorer.score(twice + [conv(PROMPTS[1], RUN[1])])
    assert second[1] == first[1] and second[3] == first[1] and second[2] == first[0]
    assert len(scored) == 5  # 4 + the one new conversation: identical texts are scored once
    outcomes = win_rate(second[1:3], [first[1], first[0]])
    assert outcomes["ties"] == 2 and outcomes["win_rate"] == 0.5


def test_held_out_pair_metrics_equal_the_dpo_implicit_reward_by_hand(evaluated):
    """reward = beta * (sum log p_policy - sum log p_ref) over response tokens, from plain
    full-softmax forwards of the policy and the untrained model on the held-out pairs."""
    from transformers import AutoModelForCausalLM

    datamodule = evaluated["cli"].datamodule
    val = datamodule.tokenized_rows()["val"]
    reference = AutoModelForCausalLM.from_pretrained(evaluated["tiny"]).eval()

    def logp(model, prompt_ids, response_ids) -> float:
        ids = torch.tensor([list(prompt_ids) + list(response_ids)])
        with torch.no_grad():
            logps = model(ids).logits.log_softmax(-1)[0, :-1].gather(-1, ids[0, 1:, None])
        return float(logps[len(prompt_ids) - 1 :].sum())

    margins = []
    for row in val:
        rewards = [
            BETA * (logp(evaluated["policy"], row["prompt_ids"], row[f"{s}_ids"])
                    - logp(reference, row["prompt_ids"], row[f"{s}_ids"]))
            for s in ("chosen", "rejected")
        ]  # fmt: skip
        margins.append(rewards[0] - rewards[1])
    got = results(evaluated)
    for name in ("ckpt", "folder"):  # the same weights as a .ckpt and as an exported folder
        pairs = got[name]["pairs"]
        assert pairs["margin"] == pytest.approx(np.mean(margins), abs=1e-4)
        assert pairs["reward_accuracy"] == pytest.approx(np.mean([m > 0 for m in margins]))
        assert 0 <= pairs["token_sign_agreement"] <= 1  # the data carries token rewards
    assert abs(np.mean(margins)) > 1e-3  # the checkpoint's weights, not the reference's


def test_length_statistics_table_and_plots(evaluated):
    got = results(evaluated)["ckpt"]["answers"]
    tokens = [len(a) for a in RUN]  # output_tokens as written in the predictions file
    assert got["tokens"] == pytest.approx(
        {"mean": np.mean(tokens), "median": np.median(tokens), "p95": np.percentile(tokens, 95)}
    )
    words = [len(a.split()) for a in RUN]
    assert got["words"]["mean"] == pytest.approx(sum(words) / 4)
    assert got["hit_max_new_tokens"] == 0.25  # one of four answers ended on the length limit
    table = (evaluated["root"] / "report" / "evaluation.md").read_text().splitlines()
    assert [line.split("|")[1].strip() for line in table[2:]] == ["ckpt", "folder", "reference"]
    for png in ("evaluation.png", "curves.png"):
        assert (evaluated["root"] / "report" / png).read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(OutputFolderError, match="--output.overwrite"):
        cli_main(evaluated["args"])


def test_statistics_helpers_by_hand():
    assert length_stats([1, 2, 3, 10]) == pytest.approx({"mean": 4.0, "median": 2.5, "p95": 8.95})
    result = win_rate([1.0, 0.0, 2.0, 1.0, 1.0], [0.0, 0.0, 3.0, 0.0, 0.0])  # 1, 0.5, 0, 1, 1
    assert result["win_rate"] == pytest.approx(0.7)
    # s^2 = (0.09 + 0.04 + 0.49 + 0.09 + 0.09) / 4 = 0.2; the upper end is clipped to 1
    assert result["ci_low"] == pytest.approx(0.7 - 1.96 * math.sqrt(0.2) / math.sqrt(5))
    assert result["ci_high"] == 1.0
