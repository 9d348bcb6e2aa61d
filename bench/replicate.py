"""A small replication of T-REG: DPO, DPO + T-REG, SimPO and SimPO + T-REG from the same start.

All four variants train the same model on the same pairs in the same order with the same seed,
learning rate, schedule and number of steps; only the loss and the regularizer differ. The token
rewards ``r_hat`` and the reference log-probs are annotated once and shared. Each trained policy
is then judged as ``treg evaluate`` judges a run: on the held-out pairs (implicit-reward
accuracy and margin under the variant's own loss, token-reward agreement) and on its greedy
answers to the held-out prompts (length statistics; with ``--reward-model`` the mean reward and
the win rate against the untrained policy's answers, ties half, 95% interval).

Written to ``--out`` (default bench/results/replicate/): ``evaluation.md`` / ``evaluation.json``
(one row per variant and one for the untrained reference), ``curves.png`` (loss, reward accuracy,
margin, T-REG term, token-reward correlation per step), ``evaluation.png`` (bars), the answers
(``answers/*.jsonl``), ``settings.json`` and ``timings.json``. Models, caches and logs go to
``--work-dir`` (default outputs/replicate/).

    python bench/replicate.py --size cpu          # SmolLM2-135M-Instruct, ~30 min on 2 CPU cores
    python bench/replicate.py --size gpu --model HuggingFaceTB/SmolLM2-1.7B-Instruct \\
        --reward-model Skywork/Skywork-Reward-Llama-3.1-8B-v0.2
    python bench/replicate.py --dry-run --out /tmp/replicate   # tiny model built here, seconds

The CPU size was set from measured step times (see bench/README.md, "Replication").
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from phases import Clock  # noqa: E402

HH_RLHF = (
    Path(__file__).resolve().parents[2] / "shared" / "data" / "hh-rlhf-harmless-base-test.jsonl.gz"
)


@dataclass(frozen=True)
class Size:
    """One setting of the benchmark (every variant gets the same)."""

    model: str
    pairs: int  # pairs read from the data; val_pairs of them are held out
    val_pairs: int
    steps: int  # optimizer steps per variant
    batch_size: int
    lr: float
    max_length: int
    max_prompt_length: int
    answers: int  # held-out prompts answered per policy
    max_new_tokens: int
    val_every: int  # validation every this many steps (the curves' dots)
    precision: str = "32-true"
    torch_dtype: str = "float32"
    accelerator: str = "cpu"


SIZES = {
    # 2 pairs of <= 256 tokens per step: ~3 s per step on 2 cores; 64 steps = one epoch of the
    # 128 training pairs; 30 min in all, measured (bench/README.md, "replicate.py").
    "cpu": Size("smollm2", pairs=160, val_pairs=32, steps=64, batch_size=2, lr=5e-6,
                max_length=256, max_prompt_length=128, answers=24, max_new_tokens=96,
                val_every=32),
    "gpu": Size("HuggingFaceTB/SmolLM2-1.7B-Instruct", pairs=4000, val_pairs=300, steps=460,
                batch_size=8, lr=1e-6, max_length=1024, max_prompt_length=512, answers=300,
                max_new_tokens=512, val_every=115, precision="bf16-true",
                torch_dtype="bfloat16", accelerator="gpu"),
    "dry-run": Size("", pairs=12, val_pairs=4, steps=4, batch_size=2, lr=1e-2, max_length=64,
                    max_prompt_length=32, answers=4, max_new_tokens=8, val_every=2),
}  # fmt: skip


def variants():
    """name -> (loss, regularizer); the paper's settings for beta / gamma / alpha."""
    from treg_lightning.losses import DPOLoss, SimPOLoss, TokenRewardRegularizer

    return {
        "DPO": (DPOLoss(beta=0.1), None),
        "DPO + T-REG": (DPOLoss(beta=0.1), TokenRewardRegularizer(alpha=0.25)),
        "SimPO": (SimPOLoss(beta=2.0, gamma_beta_ratio=0.5), None),
        "SimPO + T-REG": (SimPOLoss(beta=2.0, gamma_beta_ratio=0.5),
                          TokenRewardRegularizer(alpha=0.25)),
    }  # fmt: skip


def slug(name: str) -> str:
    return name.lower().replace(" + ", "-").replace(" ", "-")


# --- the dry run's tiny model, reward model and pairs ----------------------------------------


def build_dry_run(work: Path) -> tuple[str, str, str]:
    """A 2-layer Llama with a byte-level chat tokenizer, a tiny reward model and 12 pairs."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        LlamaForSequenceClassification,
        PreTrainedTokenizerFast,
    )

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>",
                                        eos_token="<|end|>", pad_token="<pad>")  # fmt: skip
    tokenizer.chat_template = (
        "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>"
        "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    shape = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 tie_word_embeddings=False)  # fmt: skip
    torch.manual_seed(0)
    policy = LlamaForCausalLM(LlamaConfig(**shape, eos_token_id=tokenizer.eos_token_id,
                                          pad_token_id=tokenizer.pad_token_id))  # fmt: skip
    reward = LlamaForSequenceClassification(LlamaConfig(**shape, num_labels=1))
    for model, folder in ((policy, work / "tiny"), (reward, work / "tiny-rm")):
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    pairs = work / "pairs.jsonl"
    with pairs.open("w") as f:
        for i in range(SIZES["dry-run"].pairs):
            row = {"prompt": f"What is {i} + {i}?", "chosen": f"It is {2 * i}.",
                   "rejected": f"It is {2 * i + 1}, I think." + " really" * (i % 3)}  # fmt: skip
            f.write(json.dumps(row) + "\n")
    return str(work / "tiny"), str(work / "tiny-rm"), str(pairs)


# --- the benchmark ---------------------------------------------------------------------------


def datamodule_for(size: Size, source: str, cache_dir: Path, seed: int):
    from treg_lightning.data.datamodule import PreferenceDataModule
    from treg_lightning.rewards import ContrastiveRewards

    rewards = ContrastiveRewards(store_reference_logps=True, cache_dir=str(cache_dir),
                                 evaluator_dtype=size.torch_dtype)  # fmt: skip
    return PreferenceDataModule(
        source, tokenizer=size.model, limit=size.pairs, val_fraction=size.val_pairs / size.pairs,
        max_length=size.max_length, max_prompt_length=size.max_prompt_length,
        batch_size=size.batch_size, eval_batch_size=2 * size.batch_size, seed=seed,
        rewards=rewards,
    )  # fmt: skip


def train(size: Size, name: str, loss, regularizer, data, work: Path, seed: int):
    """Train one variant; returns (module, exported policy folder, log folder)."""
    import lightning as L
    import torch
    from lightning.pytorch.loggers import CSVLogger

    from treg_lightning.module import PreferenceModule
    from treg_lightning.training.callbacks import ExportOnFitEnd

    L.seed_everything(seed, verbose=False)
    module = PreferenceModule(
        size.model, loss=loss, regularizer=regularizer, live_reference=False,
        optimizer=partial(torch.optim.AdamW, lr=size.lr, weight_decay=0.0),
        torch_dtype=size.torch_dtype,
    )  # fmt: skip
    logger = CSVLogger(work / "logs", name=slug(name), version=0)
    trainer = L.Trainer(
        accelerator=size.accelerator, devices=1, precision=size.precision,
        max_steps=size.steps, val_check_interval=size.val_every, check_val_every_n_epoch=None,
        num_sanity_val_steps=0, log_every_n_steps=1, logger=logger, enable_checkpointing=False,
        use_distributed_sampler=False, enable_model_summary=False, gradient_clip_val=1.0,
        callbacks=[ExportOnFitEnd(export_dir=str(work / "policies" / slug(name)),
                                  heatmap_path=None)],
    )  # fmt: skip
    trainer.fit(module, datamodule=data)
    return module, work / "policies" / slug(name), Path(logger.log_dir)


def answer(size: Size, policy: str, data, out: Path, overwrite: bool) -> Path:
    """Greedy answers of ``policy`` to the first ``size.answers`` held-out prompts."""
    from treg_lightning.answers.generation import SamplingSettings, TransformersBackend
    from treg_lightning.answers.predictions import (
        AnswerJob,
        PredictJob,
        PredictSettings,
        run_predict,
    )
    from treg_lightning.answers.settings import GenerationSettings
    from treg_lightning.cli.main import TRegTrainer
    from treg_lightning.module import PreferenceModule
    from treg_lightning.outputs import Output

    module = PreferenceModule(policy, torch_dtype=size.torch_dtype)
    sampling = SamplingSettings(max_new_tokens=size.max_new_tokens, temperature=0.0)
    generation = GenerationSettings(batch_size=8, shard_size=8, generator=Path(policy).name)
    settings = PredictSettings(Output(str(out), overwrite), generation, sampling)
    answers = AnswerJob(module, data, None, None, "val", size.answers, TransformersBackend())
    trainer = TRegTrainer(accelerator=size.accelerator, devices=1, logger=False)
    return run_predict(trainer, PredictJob(answers, settings))


def run(size: Size, out: Path, work: Path, source: str, reward_model: str | None, seed: int,
        overwrite: bool) -> list[dict]:  # fmt: skip
    from treg_lightning.answers import evaluation
    from treg_lightning.answers.predictions import read_jsonl
    from treg_lightning.cli.main import TRegTrainer

    evaluation.check_report_folder(out, overwrite)  # before an hour of work, not after
    clock = Clock()
    data = datamodule_for(size, source, work / "cache", seed)
    with clock("annotate (token rewards + reference logps, once)"):
        data.prepare_data()
        data.setup("fit")
    answers_dir = out / "answers"
    answers_dir.mkdir(parents=True, exist_ok=True)
    with clock("answers: untrained reference"):
        reference = answer(size, size.model, data, answers_dir / "reference.jsonl", overwrite)
    results, runs = [], []
    judge = TRegTrainer(accelerator=size.accelerator, devices=1, logger=False,
                        enable_progress_bar=False, precision=size.precision)  # fmt: skip
    for name, (loss, regularizer) in variants().items():
        with clock(f"train: {name}"):
            module, policy, log_dir = train(size, name, loss, regularizer, data, work, seed)
        with clock(f"held-out pairs: {name}"):
            pairs = evaluation.pair_metrics(judge, module, data)
        del module
        with clock(f"answers: {name}"):
            path = answer(size, str(policy), data, answers_dir / f"{slug(name)}.jsonl", overwrite)
        rows = read_jsonl(path)
        results.append({"run": name, "pairs": pairs, "predictions": str(path),
                        "answers": evaluation.answer_stats(rows)})  # fmt: skip
        runs.append(evaluation.EvalRun(name, predictions=str(path), log_dir=str(log_dir)))
    reference_rows = read_jsonl(reference)
    # The untrained policy: "reference" is the row name evaluation.score_answers compares to.
    results.append({"run": "reference", "predictions": str(reference),
                    "answers": evaluation.answer_stats(reference_rows)})  # fmt: skip
    if reward_model:
        with clock("reward model: mean reward and win rates"):
            settings = evaluation.EvaluateSettings(reward_model=reward_model,
                                                   reward_dtype=size.torch_dtype)  # fmt: skip
            answers = {r.name: read_jsonl(Path(r.predictions)) for r in runs}
            evaluation.score_answers(results, answers, reference_rows, settings)
    evaluation.write_report(results, runs, out, overwrite)
    (out / "timings.json").write_text(json.dumps(clock.seconds, indent=1))
    described = {name: [repr(loss), repr(reg)] for name, (loss, reg) in variants().items()}
    settings = {"size": asdict(size), "seed": seed, "source": source,
                "reward_model": reward_model, "variants": described}  # fmt: skip
    (out / "settings.json").write_text(json.dumps(settings, indent=1))
    print(evaluation.markdown_table(results))
    print(json.dumps(clock.seconds, indent=1))
    return results


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--dry-run", action="store_true",
                        help="tiny model, reward model and pairs built here; seconds")  # fmt: skip
    parser.add_argument("--out", type=Path, default=Path("bench/results/replicate"))
    parser.add_argument("--work-dir", type=Path, default=Path("outputs/replicate"))
    parser.add_argument("--data", default=str(HH_RLHF), help="preference pairs (any source)")
    parser.add_argument("--model", default=None, help="override the size's model")
    parser.add_argument("--reward-model", default=None,
                        help="a sequence-classification reward model for win rates")  # fmt: skip
    parser.add_argument("--steps", type=int, default=None, help="override the size's steps")
    parser.add_argument("--pairs", type=int, default=None, help="override the size's pairs")
    parser.add_argument("--val-pairs", type=int, default=None, help="held-out pairs")
    parser.add_argument("--answers", type=int, default=None, help="prompts answered per policy")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true", help="replace earlier results")
    args = parser.parse_args(argv)
    size = SIZES["dry-run" if args.dry_run else args.size]
    given = {"model": args.model, "steps": args.steps, "pairs": args.pairs,
             "val_pairs": args.val_pairs, "answers": args.answers}  # fmt: skip
    overrides = {k: v for k, v in given.items() if v}
    size = replace(size, **overrides)
    work = args.work_dir
    work.mkdir(parents=True, exist_ok=True)
    source, reward_model = args.data, args.reward_model
    if args.dry_run:
        model, reward_model, source = build_dry_run(work)
        size = replace(size, model=model)
    elif not Path(source).exists() and "/" in source and Path(source).suffix:
        raise SystemExit(f"{source} not found: pass --data (a .jsonl of pairs or a hub id).")
    return run(size, args.out, work, source, reward_model, args.seed, args.overwrite)


if __name__ == "__main__":
    main()
