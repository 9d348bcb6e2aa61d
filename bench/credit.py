"""Does T-REG put the credit where it belongs? Variants trained on the credit benchmark.

Every variant trains the same model (LoRA adapters on the same base, same adapter init per
seed) on the same pairs in the same order with the same budget; only the loss, the regularizer
and the token-reward source differ. Per seed and variant, on the held-out pairs (never trained
on; split by prompt, ``bench/credit_data.py``):

- the token rewards' own quality: AUROC of ``-r_hat`` at the defect tokens of the rejected
  responses (the audit; per source, before training);
- after training, AUROC at the defect tokens of ``-(log pi - log pi_ref)`` (what training
  changed) and of minus the loss's implicit token reward (``implicit_token_rewards``, as
  ``ImplicitRewards`` uses it: ``c(y) (log pi - log pi_ref)`` for DPO, ``c(y) log pi`` for
  SimPO);
- pair accuracy and margin under the variant's loss, and the length-normalized log-prob margin
  (``mean log pi(y_w) - mean log pi(y_l)``, any loss), before and after;
- mean ``log pi - log pi_ref`` on the defect tokens vs the other rejected tokens (and chosen).

Each figure is a mean over seeds with a 95% interval from a bootstrap over seeds and pairs.
Written to ``--out`` (default bench/results/credit/): ``results.md`` / ``results.json``,
``auroc.png``, ``logp_change.png``, ``heatmaps.png`` (held-out pairs, DPO vs DPO + T-REG),
``settings.json``, ``timings.json``. Models, caches, logs and per-token values go to
``--work-dir`` (default outputs/credit_run/).

    python bench/credit.py --size cpu-small   # 3 seeds x 3 variants, SmolLM2-135M, 2 CPU cores
    python bench/credit.py --size cpu         # all 10 variants, 48 train / 64 held-out pairs
    python bench/credit.py --size gpu --model HuggingFaceTB/SmolLM2-1.7B-Instruct
    python bench/credit.py --size dry-run --out /tmp/credit   # tiny model built here
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
import sys
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import credit_data  # noqa: E402
import credit_metrics as cm  # noqa: E402
import credit_sources  # noqa: E402
from phases import Clock  # noqa: E402

# "(source)" names the token-reward source; "(source, alpha A)" overrides the size's alpha
# (the strength check: does a stronger regularizer move the credit the way it should?).
ALL_VARIANTS = (
    "DPO", "DPO + T-REG (spans)", "DPO + T-REG (spans, alpha 2)", "DPO + T-REG (instruct)",
    "DPO + T-REG (revise)", "DPO + T-REG (two-model)", "SimPO", "SimPO + T-REG (spans)",
    "SimPO + T-REG (instruct)", "SimPO + T-REG (two-model)",
)  # fmt: skip


# The decoder's linear layers (Llama-style names), for adapters on some layers only.
LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass(frozen=True)
class Size:
    """One setting (every variant and seed gets the same)."""

    model: str
    train_pairs: int
    heldout_pairs: int
    steps: int
    batch_size: int
    lr: float
    max_length: int
    max_prompt_length: int
    variants: tuple[str, ...]
    seeds: int = 3
    lora_rank: int = 16
    lora_layers: int | None = None  # adapters on the top this many decoder layers (None: all)
    alpha: float = 0.25  # T-REG strength (the paper's 0.25)
    sft_steps: int = 0  # two-model rewards: fine-tuning steps of each LoRA copy
    sft_lr: float = 5e-4
    precision: str = "32-true"
    torch_dtype: str = "float32"
    accelerator: str = "cpu"


SIZES = {
    # 3 seeds x 3 variants x 8 steps of 2 pairs (one epoch of 16 training pairs) at <= 80
    # tokens, LoRA rank 16 on the top 8 of 30 layers, reference log-probs computed once: sized
    # for ~25 min on 2 CPU cores shared with five other jobs, one thread (bench/README.md).
    "cpu-small": Size("smollm2", train_pairs=16, heldout_pairs=24, steps=8, batch_size=2,
                      lr=1e-3, max_length=80, max_prompt_length=40, lora_layers=8,
                      variants=ALL_VARIANTS[:3]),
    # 3 seeds x 10 variants x 24 steps of 2 pairs (one epoch of 48 training pairs) at <= 96
    # tokens, 48 held-out pairs, the same adapters as cpu-small; each of the two models gets 64
    # steps of one answer: 26 min on 2 CPU cores (bench/results/credit/cpu/timings.json).
    "cpu": Size("smollm2", train_pairs=48, heldout_pairs=48, steps=24, batch_size=2, lr=1e-3,
                max_length=96, max_prompt_length=48, lora_layers=8, variants=ALL_VARIANTS,
                sft_steps=64),
    "gpu": Size("HuggingFaceTB/SmolLM2-1.7B-Instruct", train_pairs=1000, heldout_pairs=300,
                steps=250, batch_size=8, lr=2e-4, max_length=512, max_prompt_length=256,
                variants=ALL_VARIANTS, sft_steps=500, lora_rank=32, precision="bf16-true",
                torch_dtype="bfloat16", accelerator="gpu"),
    "dry-run": Size("", train_pairs=8, heldout_pairs=8, steps=4, batch_size=2, lr=1e-2,
                    max_length=384, max_prompt_length=96, seeds=2, sft_steps=4,
                    variants=("DPO", "DPO + T-REG (spans)", "DPO + T-REG (two-model)",
                              "SimPO + T-REG (spans)")),
}  # fmt: skip


def slug(name: str) -> str:
    for a, b in ((" + ", "-"), (" (", "-"), (")", ""), (" ", "-")):
        name = name.replace(a, b)
    return name.lower()


def variant_alpha(name: str, default: float) -> float:
    """The T-REG strength of a variant: ``alpha A`` in its name, else ``default``."""
    inside = name.split("(")[1].rstrip(")").split(", ") if "(" in name else []
    given = [part.removeprefix("alpha ") for part in inside if part.startswith("alpha ")]
    return float(given[0]) if given else default


def loss_and_regularizer(name: str, alpha: float):
    from treg_lightning.losses import DPOLoss, SimPOLoss, TokenRewardRegularizer

    loss = (
        DPOLoss(beta=0.1) if name.startswith("DPO") else SimPOLoss(beta=2.0, gamma_beta_ratio=0.5)
    )
    alpha = variant_alpha(name, alpha)
    regularizer = TokenRewardRegularizer(alpha=alpha) if "T-REG" in name else None
    return loss, regularizer


def source_key(name: str) -> str | None:
    return name.split("(")[1].rstrip(")").split(", ")[0] if "(" in name else None


# --- the pairs -------------------------------------------------------------------------------


def select_pairs(size: Size, data_dir: Path, work: Path, tokenizer) -> dict[str, Path]:
    """The first pairs of each split (in a fixed shuffled order, the two conditions alternating)
    whose prompt, chosen and rejected fit ``max_length`` untruncated, so every defect span is
    trained and scored whole. Written to ``work/pairs/{train,heldout}.jsonl``."""
    from treg_lightning.data.tokenize import PairTokenizer

    pair_tokenizer = PairTokenizer(tokenizer, size.max_length, size.max_prompt_length)
    out = {}
    for split, n in (("train", size.train_pairs), ("heldout", size.heldout_pairs)):
        rows = credit_sources.read_rows(data_dir / f"{split}.jsonl")
        random.Random(1234).shuffle(rows)
        by_condition = {"minimal": [], "non_minimal": []}
        for row in rows:
            prompt = pair_tokenizer.prompt_ids(row["prompt"])
            room = size.max_length - len(prompt)
            lengths = [len(pair_tokenizer.response_ids(row[s][0]["content"]))
                       for s in ("chosen", "rejected")]  # fmt: skip
            if len(prompt) <= size.max_prompt_length and max(lengths) <= room:
                by_condition[row["condition"]].append(row)
        chosen = [r for pair in zip(*by_condition.values()) for r in pair][:n]
        if len(chosen) < n:
            raise SystemExit(f"only {len(chosen)} {split} pairs fit max_length {size.max_length}")
        path = work / "pairs" / f"{split}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(credit_data.dumps(chosen))
        out[split] = path
    return out


def tokenized(size: Size, path: Path) -> list[dict]:
    """The rows of ``path`` as the data module tokenizes them (file order, with ``index``)."""
    from treg_lightning.data.datamodule import PreferenceDataModule

    data = PreferenceDataModule(str(path), tokenizer=size.model, max_length=size.max_length,
                                max_prompt_length=size.max_prompt_length, rewards=None)  # fmt: skip
    return data.tokenized_rows()["train"]


# --- sources ---------------------------------------------------------------------------------


def make_source(key: str | None, files: dict[str, Path], size: Size, work: Path, notes: dict):
    """(train source, held-out source) of the variant's token rewards; None for none."""
    if key is None:
        return None, None
    if key == "spans":
        from treg_lightning.rewards.spans import SpanRewards

        notes["spans"] = "treg_lightning.rewards.spans.SpanRewards()"
        cache = str(work / "cache")
        return SpanRewards(cache_dir=cache), SpanRewards(cache_dir=cache)
    if key in ("instruct", "revise"):
        from treg_lightning.rewards import ContrastiveRewards

        def build():
            return ContrastiveRewards(template=key, store_reference_logps=False,
                                      cache_dir=str(work / "cache"), progress=False,
                                      evaluator_dtype=size.torch_dtype)  # fmt: skip

        notes[key] = f"treg_lightning.rewards.ContrastiveRewards(template={key!r})"
        return build(), build()
    if key == "two-model":
        from treg_lightning.rewards.model_contrast import ModelContrastRewards

        positive, negative = two_models(size, files, work)

        def contrast():
            return ModelContrastRewards(
                positive=positive,
                negative=negative,
                scale=1.0,
                dtype=size.torch_dtype,
                cache_dir=str(work / "cache"),
            )

        notes["two-model"] = (
            "treg_lightning.rewards.model_contrast.ModelContrastRewards(scale=1.0): LoRA copies "
            f"fine-tuned {size.sft_steps} steps (lr {size.sft_lr}) on the train split's chosen "
            "/ rejected answers"
        )
        return contrast(), contrast()
    raise ValueError(key)


def two_models(size: Size, files: dict[str, Path], work: Path) -> tuple[str, str]:
    """Two LoRA copies of the base, fine-tuned on the train split's chosen / rejected answers."""
    rows = tokenized(size, files["train"])
    data = credit_data.hashlib.sha256(files["train"].read_bytes()).hexdigest()[:12]
    folders = []
    for side in ("chosen", "rejected"):  # the folder names what made it: reused only if equal
        folder = (work / "two-model"
                  / f"{side}-{size.sft_steps}x{size.sft_lr}-r{size.lora_rank}-{data}")  # fmt: skip
        credit_sources.finetune_lora(size.model, rows, side, folder, size.sft_steps, size.sft_lr,
                                     seed=0, rank=size.lora_rank)  # fmt: skip
        folders.append(str(folder))
    return folders[0], folders[1]


def audit(source, size: Size, heldout_path: Path, records: list[dict]) -> dict:
    """``treg audit``'s AUROC of ``-r_hat`` at the defect tokens of the held-out rejected
    responses (``audit_rows``' ``auroc_negative``, 95% interval over pairs), per condition.

    The defect tokens are marked -1 and the other rejected tokens left unmarked; the end-of-turn
    token (no text, no defect) is marked 0, which the audit counts in neither class."""
    from treg_lightning.data.datamodule import PreferenceDataModule
    from treg_lightning.rewards.audit import audit_rows

    np = cm.np
    data = PreferenceDataModule(str(heldout_path), tokenizer=size.model,
                                max_length=size.max_length,
                                max_prompt_length=size.max_prompt_length,
                                rewards=source)  # fmt: skip
    rows = data.annotate()["train"]
    marked = []
    for record, row in zip(records, rows, strict=True):
        marks = np.where(np.asarray(record["labels"]) == 1, -1.0, np.nan)
        marked.append({"condition": record["condition"],
                       "chosen_token_rewards": row["chosen_token_rewards"],
                       "rejected_token_rewards": row["rejected_token_rewards"],
                       "rejected_marks": np.r_[marks, 0.0]})  # fmt: skip
    out = {}
    for condition in ("all", "minimal", "non_minimal"):
        keep = [r for r in marked if condition in ("all", r["condition"])]
        m = audit_rows(keep, bootstrap=400)["metrics"]["auroc_negative"]
        out[condition] = {"mean": m["value"], "low": m["low"], "high": m["high"],
                          "pairs": len(keep)}  # fmt: skip
    return out


# --- training and scoring --------------------------------------------------------------------


def train(size: Size, name: str, seed: int, train_path: Path, source, work: Path):
    import lightning as L
    import torch
    from lightning.pytorch.loggers import CSVLogger
    from peft import LoraConfig

    from treg_lightning.data.datamodule import PreferenceDataModule
    from treg_lightning.module import PreferenceModule

    loss, regularizer = loss_and_regularizer(name, size.alpha)
    data = PreferenceDataModule(str(train_path), tokenizer=size.model,
                                max_length=size.max_length,
                                max_prompt_length=size.max_prompt_length,
                                batch_size=size.batch_size, seed=seed, rewards=source)  # fmt: skip
    L.seed_everything(seed, verbose=False)
    layers = None
    if size.lora_layers is not None:
        from transformers import AutoConfig

        from treg_lightning.models.loading import resolve_model_source

        total = AutoConfig.from_pretrained(resolve_model_source(size.model).path).num_hidden_layers
        layers = list(range(total - size.lora_layers, total))
    module = PreferenceModule(
        size.model, loss=loss, regularizer=regularizer, live_reference=False,
        optimizer=partial(torch.optim.AdamW, lr=size.lr, weight_decay=0.0),
        torch_dtype=size.torch_dtype,
        peft=LoraConfig(r=size.lora_rank, lora_alpha=2 * size.lora_rank, lora_dropout=0.0,
                        target_modules=LINEAR if layers else "all-linear",
                        layers_to_transform=layers),
    )  # fmt: skip
    logger = CSVLogger(work / "logs", name=f"{slug(name)}-seed{seed}", version=0)
    trainer = L.Trainer(
        accelerator=size.accelerator, devices=1, precision=size.precision,
        max_steps=size.steps, limit_val_batches=0, num_sanity_val_steps=0,
        log_every_n_steps=1, logger=logger, enable_checkpointing=False,
        use_distributed_sampler=False, enable_model_summary=False, gradient_clip_val=1.0,
        enable_progress_bar=False,
    )  # fmt: skip
    trainer.fit(module, datamodule=data)
    return module


_REFERENCE: dict[tuple, dict] = {}


def score(module, rows: list[dict], pairs: list[dict], tokenizer) -> list[dict]:
    """Per held-out pair: token values of the rejected response (policy vs reference), defect
    labels, and the pair's margins after training and before (policy = reference)."""
    import torch

    from treg_lightning.data.collate import PreferenceCollator
    from treg_lightning.losses.base import implicit_token_rewards
    from treg_lightning.models.lora import adapters_disabled
    from treg_lightning.pairs import PairScores, ResponseScores

    np = cm.np
    module.eval()
    collate = PreferenceCollator(tokenizer.pad_token_id or tokenizer.eos_token_id)
    records = []
    for row, pair in zip(rows, pairs, strict=True):
        batch = collate([row])
        with torch.no_grad():
            policy = module.model_token_logps(module.policy, batch)
            key = (tuple(row["prompt_ids"]), tuple(row["chosen_ids"]), tuple(row["rejected_ids"]))
            if key not in _REFERENCE:  # the base model: the same for every run
                with adapters_disabled(module.policy):
                    _REFERENCE[key] = module.model_token_logps(module.policy, batch)
            reference = _REFERENCE[key]

        def scores(logps, ref):
            sides = (ResponseScores.from_tokens(logps[s], batch[f"{s}_response_mask"], ref[s])
                     for s in ("chosen", "rejected"))  # fmt: skip
            return PairScores(*sides)

        after, before = scores(policy, reference), scores(reference, reference)
        out_after, out_before = module.loss(after), module.loss(before)
        mask = {s: batch[f"{s}_response_mask"][0] for s in ("chosen", "rejected")}
        delta = {s: (policy[s][0] - reference[s][0])[mask[s]].numpy() for s in mask}
        implicit = implicit_token_rewards(out_after, "rejected", after.rejected)[0]
        implicit = implicit[mask["rejected"]].numpy()
        text = pair["rejected"][0]["content"]
        labels = np.asarray(credit_data.token_labels(tokenizer, text, pair["rejected_spans"]))
        assert len(labels) == len(delta["rejected"]), "labels and response tokens disagree"

        def mean_logp(p, side):
            return float(p[side][0][mask[side]].mean())

        records.append({
            "id": pair["id"], "condition": pair["condition"], "kind": pair["kind"],
            "labels": labels[:-1],  # the end-of-turn token is no defect and no text
            "delta": -delta["rejected"][:-1], "implicit": -implicit[:-1],
            "surprise": -reference["rejected"][0][mask["rejected"]].numpy()[:-1],
            "rejected_delta": delta["rejected"], "chosen_delta": delta["chosen"],
            "defect_change": float(delta["rejected"][:-1][labels[:-1] == 1].mean()),
            "rest_change": float(delta["rejected"][:-1][labels[:-1] == 0].mean())
            if (labels[:-1] == 0).any() else float("nan"),
            "chosen_change": float(delta["chosen"].mean()),
            "margin": float(out_after.margins[0]), "margin_before": float(out_before.margins[0]),
            "logp_margin": mean_logp(policy, "chosen") - mean_logp(policy, "rejected"),
            "logp_margin_before": mean_logp(reference, "chosen") - mean_logp(reference, "rejected"),
            "rejected_ids": row["rejected_ids"],
        })  # fmt: skip
    return records


def summarize(per_seed: list[list[dict]]) -> dict:
    """Each metric per condition: mean over seeds, 95% interval over seeds and pairs."""
    np = cm.np
    out = {}
    for condition in ("all", "minimal", "non_minimal"):
        keep = [[r for r in rs if condition in ("all", r["condition"])] for rs in per_seed]
        metrics = {
            "auroc_delta": lambda rs: cm.pooled_auroc(rs, "delta"),
            "auroc_implicit": lambda rs: cm.pooled_auroc(rs, "implicit"),
            "accuracy": lambda rs: float(np.mean([r["margin"] > 0 for r in rs])),
            "accuracy_before": lambda rs: float(np.mean([r["margin_before"] > 0 for r in rs])),
            "margin": lambda rs: cm.mean_over(rs, "margin"),
            "margin_before": lambda rs: cm.mean_over(rs, "margin_before"),
            "logp_accuracy": lambda rs: float(np.mean([r["logp_margin"] > 0 for r in rs])),
            "logp_accuracy_before": lambda rs: float(
                np.mean([r["logp_margin_before"] > 0 for r in rs])),
            "logp_margin": lambda rs: cm.mean_over(rs, "logp_margin"),
            "logp_margin_before": lambda rs: cm.mean_over(rs, "logp_margin_before"),
            "defect_change": lambda rs: cm.mean_over(rs, "defect_change"),
            "rest_change": lambda rs: cm.mean_over(rs, "rest_change"),
            "chosen_change": lambda rs: cm.mean_over(rs, "chosen_change"),
        }  # fmt: skip
        out[condition] = {name: cm.bootstrap(keep, f) for name, f in metrics.items()}
    return out


def save_tokens(path: Path, records: list[dict]) -> None:
    rows = [{k: (v.tolist() if hasattr(v, "tolist") else v) for k, v in r.items()}
            for r in records]  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows))


# --- report ----------------------------------------------------------------------------------


def fmt(m: dict, digits: int = 3) -> str:
    return f"{m['mean']:.{digits}f} [{m['low']:.{digits}f}, {m['high']:.{digits}f}]"


def markdown(results: dict, audits: dict, size: Size, seconds: dict) -> str:
    layers = f"top {size.lora_layers} layers" if size.lora_layers else "all layers"
    lines = [
        "# Credit benchmark: results",
        "",
        f"`bench/credit.py --size {results['size_name']}`: {size.model}, LoRA rank "
        f"{size.lora_rank} ({layers}), "
        f"{size.steps} steps x {size.batch_size} pairs, lr {size.lr}, "
        f"max_length {size.max_length}, {size.train_pairs} train / {size.heldout_pairs} "
        f"held-out pairs, {size.seeds} seeds, T-REG alpha {size.alpha}. Mean over seeds "
        "[95% interval, bootstrap over seeds and held-out pairs]. Wall time "
        f"{round(sum(seconds.values()) / 60, 1)} min.",
        "",
        "## Token rewards on held-out pairs (audit: AUROC of -r_hat at the defect tokens)",
        "",
        "| source | all | minimal | non-minimal |",
        "|---|---|---|---|",
    ]
    for key, a in audits.items():
        lines.append(f"| {key} | {fmt(a['all'])} | {fmt(a['minimal'])} | {fmt(a['non_minimal'])} |")
    lines += [
        "",
        "## After training: where the credit went (AUROC at the defect tokens, held-out rejected)",
        "",
        "`delta`: -(log pi - log pi_ref); `implicit`: minus the loss's implicit token reward.",
        "",
        "| variant | condition | AUROC delta | AUROC implicit | defect dlogp | rest dlogp | "
        "chosen dlogp |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, by_condition in results["variants"].items():
        for condition, m in by_condition.items():
            lines.append(f"| {name} | {condition} | {fmt(m['auroc_delta'])} | "
                         f"{fmt(m['auroc_implicit'])} | {fmt(m['defect_change'])} | "
                         f"{fmt(m['rest_change'])} | {fmt(m['chosen_change'])} |")  # fmt: skip
    lines += [
        "",
        "## Held-out pairs: accuracy and margin, before -> after",
        "",
        "Under the variant's loss (DPO before training: margin 0, accuracy 0 by definition), and "
        "by mean token log-prob (any loss).",
        "",
        "| variant | condition | accuracy | margin | logp accuracy | logp margin |",
        "|---|---|---|---|---|---|",
    ]
    for name, by_condition in results["variants"].items():
        for condition, m in by_condition.items():
            lines.append(
                f"| {name} | {condition} | {m['accuracy_before']['mean']:.3f} -> "
                f"{fmt(m['accuracy'])} | {m['margin_before']['mean']:.3f} -> {fmt(m['margin'])} | "
                f"{m['logp_accuracy_before']['mean']:.3f} -> {fmt(m['logp_accuracy'])} | "
                f"{m['logp_margin_before']['mean']:.3f} -> {fmt(m['logp_margin'])} |"
            )
    return "\n".join(lines) + "\n"


def training_summary(work: Path, variants, seeds: int) -> dict:
    """Per variant: the training loss at the first and last step, the last training margin and
    the mean T-REG term, averaged over seeds (from the CSV logs)."""
    from treg_lightning.answers.plots import read_metrics

    out = {}
    for name in variants:
        rows = []
        for seed in range(seeds):
            series = read_metrics(work / "logs" / f"{slug(name)}-seed{seed}")
            loss = series.get("train/loss_step", [])
            margin = series.get("train/margin_step", [])
            treg = [v for _, v in series.get("train/treg_step", [])]
            rows.append([loss[0][1], loss[-1][1], margin[-1][1],
                         sum(treg) / len(treg) if treg else 0.0])  # fmt: skip
        out[name] = dict(zip(("loss_first", "loss_last", "margin_last", "treg_mean"),
                             (sum(col) / len(col) for col in zip(*rows))))  # fmt: skip
    return out


def training_markdown(summary: dict) -> str:
    lines = ["", "## Training (mean over seeds, from the logs)", "",
             "| variant | loss, first step | loss, last step | train margin, last step | "
             "mean T-REG term |", "|---|---:|---:|---:|---:|"]  # fmt: skip
    for name, m in summary.items():
        lines.append(f"| {name} | {m['loss_first']:.4f} | {m['loss_last']:.4f} | "
                     f"{m['margin_last']:.4f} | {m['treg_mean']:.4f} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def run(size: Size, size_name: str, out: Path, work: Path, data_dir: Path, overwrite: bool):
    from treg_lightning.models.loading import load_tokenizer

    if (out / "results.json").exists() and not overwrite:
        raise SystemExit(f"{out}/results.json exists; pass --overwrite to replace it.")
    out.mkdir(parents=True, exist_ok=True)
    clock = Clock()
    tokenizer = load_tokenizer(size.model)
    files = select_pairs(size, data_dir, work, tokenizer)
    heldout_rows = tokenized(size, files["heldout"])
    heldout_pairs = credit_sources.read_rows(files["heldout"])
    notes: dict[str, str] = {}
    sources = {}
    for name in size.variants:
        key = source_key(name)
        if key not in sources:
            with clock(f"source: {key}"):
                train_source, heldout_source = make_source(key, files, size, work, notes)
                sources[key] = (credit_sources.WithReference(train_source, size.model),
                                heldout_source)  # fmt: skip
    results = {"size_name": size_name, "variants": {}}
    per_variant: dict[str, list[list[dict]]] = {}
    for seed in range(size.seeds):
        for name in size.variants:
            with clock(f"train: {name}, seed {seed}"):
                module = train(size, name, seed, files["train"], sources[source_key(name)][0],
                               work)  # fmt: skip
            with clock(f"score: {name}, seed {seed}"):
                records = score(module, heldout_rows, heldout_pairs, tokenizer)
            save_tokens(work / "tokens" / f"{slug(name)}-seed{seed}.json", records)
            if size_name == "dry-run" or getattr(run, "save_policies", False):
                from treg_lightning.models.export import export_module

                export_module(module, work / "policies" / f"{slug(name)}-seed{seed}", tokenizer)
            per_variant.setdefault(name, []).append(records)
            del module
    for name, per_seed in per_variant.items():
        results["variants"][name] = summarize(per_seed)
    audits = {}
    for key, (_, heldout_source) in sources.items():
        if key is not None:
            with clock(f"audit: {key}"):
                audits[key] = audit(heldout_source, size, files["heldout"],
                                    per_variant[size.variants[0]][0])  # fmt: skip
    first = per_variant[size.variants[0]][0]
    audits["none: -log pi_ref (the base model's surprise)"] = {
        condition: cm.bootstrap([[r for r in first if condition in ("all", r["condition"])]],
                                lambda rs: cm.pooled_auroc(rs, "surprise"))
        for condition in ("all", "minimal", "non_minimal")
    }  # fmt: skip
    results["audit"] = audits
    results["training"] = training_summary(work, size.variants, size.seeds)
    results["seconds"] = clock.seconds
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    report = markdown(results, audits, size, clock.seconds)
    (out / "results.md").write_text(report + training_markdown(results["training"]))
    (out / "settings.json").write_text(json.dumps(
        {"size": size_name, **asdict(size), "sources": notes,
         "data": json.loads((data_dir / "fingerprint.json").read_text())["sha256_all"]
         if (data_dir / "fingerprint.json").exists() else None,
         "selected_sha256": {s: credit_data.hashlib.sha256(p.read_bytes()).hexdigest()
                             for s, p in files.items()}}, indent=1) + "\n")  # fmt: skip
    (out / "timings.json").write_text(json.dumps(clock.seconds, indent=1) + "\n")
    import credit_plots

    credit_plots.auroc_bars(results, out / "auroc.png")
    credit_plots.logp_change_bars(results, out / "logp_change.png")
    first, treg = size.variants[0], next((v for v in size.variants if "T-REG" in v), None)
    if treg is not None:
        credit_plots.heatmaps(per_variant[first][0], per_variant[treg][0], first, treg,
                              tokenizer, out / "heatmaps.png")  # fmt: skip
    print((out / "results.md").read_text())
    return results


def build_dry_run(work: Path) -> str:
    """The tiny byte-level model of ``bench/replicate.py --dry-run``; returns its folder."""
    spec = importlib.util.spec_from_file_location("replicate", BENCH / "replicate.py")
    replicate = importlib.util.module_from_spec(spec)
    sys.modules["replicate"] = replicate
    spec.loader.exec_module(replicate)
    model, _, _ = replicate.build_dry_run(work)
    return model


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=tuple(SIZES), default="cpu-small")
    parser.add_argument("--out", type=Path, default=Path("bench/results/credit"))
    parser.add_argument("--work-dir", type=Path, default=Path("outputs/credit_run"))
    parser.add_argument("--data", type=Path, default=Path("outputs/credit"),
                        help="folder of the built benchmark (built there if missing)")  # fmt: skip
    parser.add_argument("--model", default=None, help="override the size's model")
    parser.add_argument("--seeds", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--variants", nargs="*", default=None, choices=ALL_VARIANTS)
    parser.add_argument("--save-policies", action="store_true",
                        help="export each trained policy (merged) into the work dir")  # fmt: skip
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    size = SIZES[args.size]
    given = {"model": args.model, "seeds": args.seeds, "steps": args.steps,
             "variants": tuple(args.variants) if args.variants else None}  # fmt: skip
    size = replace(size, **{k: v for k, v in given.items() if v})
    work = args.work_dir
    work.mkdir(parents=True, exist_ok=True)
    if args.size == "dry-run":
        size = replace(size, model=build_dry_run(work))
    if not (args.data / "train.jsonl").exists():
        hh = credit_data.HH_RLHF if credit_data.HH_RLHF.exists() else None
        record = credit_data.build(args.data, 0, hh)
        (args.data / "fingerprint.json").write_text(json.dumps(record, indent=1))
    run.save_policies = args.save_policies
    return run(size, args.size, args.out, work, args.data, args.overwrite)


if __name__ == "__main__":
    main()
