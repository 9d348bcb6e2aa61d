"""Does T-REG put the credit where it belongs? Variants trained on the credit benchmark.

Every variant trains the same model (LoRA adapters on the same base, the same adapter init per
seed) on the same pairs in the same order with the same budget; only the regularizer and its
token-reward source differ (the ceiling control differs in its pairs). The data is the v2
layout of ``bench/credit_data.py``: balanced non-minimal pairs (the defect in either response
of a source pair at random, the other clean as chosen), held-out pairs whose defect sentences
were never trained on, one defect kind never trained on.

Variants (``--variants``; the ``cpu`` and ``gpu`` sizes run the first eight):

- ``DPO``; ``DPO + T-REG (spans, alpha A)``: the oracle, ``SpanRewards`` over the defect span
  (-0.5 on the defect tokens, 0 elsewhere), at the paper's alpha 0.25 and at 1;
- controls at alpha 1 (``bench/credit_controls.py``): ``shuffled spans`` (as many -0.5 tokens,
  none on the defect), ``uniform`` (the same total on every rejected token), ``dense signed``
  (the oracle plus +0.1 on every other token of both responses);
- ``DPO (minimal pairs)``: the ceiling control, DPO on the minimal twins of the training pairs
  (rejected = chosen + defect), reported apart;
- ``DPO + T-REG (two-model, alpha 1)``: ``ModelContrastRewards`` over two LoRA copies of the
  base fine-tuned on the chosen / rejected answers, run only once the oracle has shown an effect
  (``--two-model if-effect``, the default: the oracle's paired credit-share interval above 0);
- optional: ``SimPO``, ``SimPO + T-REG (spans, alpha 1)``, ``DPO + T-REG (instruct|revise)``.

Metrics (``bench/credit_metrics.py``), per held-out pair, end-of-turn left out, then averaged:
the credit share ``sum_D max(0, -d_t) / sum_R max(0, -d_t)`` with ``d_t = log pi - log
pi_ref`` (primary), the per-pair AUROC of ``-d_t``, the drop at the first defect token and
summed over the defect, the collateral (mean ``d_t`` over the other rejected tokens and over
the chosen response), accuracy and margin; each as a paired difference from DPO (same seed,
same pairs) with a 95% bootstrap interval over seeds and pairs, for all held-out pairs and
split by seen / unseen kind. The decision rule (``bench/credit_decision.py``) is applied to
the result.

Written to ``--out``: ``results.md`` / ``results.json``, ``tokens.json.gz`` (per-token records:
``--report-from`` recomputes every table from them without training), ``credit_share.png``,
``collateral.png``, ``heatmaps.png``, ``settings.json`` (machine, load, command),
``timings.json``. Models, caches and logs go to ``--work-dir``.

    python bench/credit.py --size cpu --out bench/results/credit/cpu-v2   # 5 seeds x 8 variants
    python bench/credit.py --size gpu --out results/credit-gpu            # SmolLM2-1.7B, 1 GPU
    python bench/credit.py --size cpu --heldout my_spans.jsonl --out /tmp/mine   # your defects
    python bench/credit.py --report-from bench/results/credit/cpu-v2 --out /tmp/again
    python bench/credit.py --size dry-run --out /tmp/credit   # tiny model built here
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shlex
import sys
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import credit_data  # noqa: E402
import credit_metrics as cm  # noqa: E402
import credit_pairs  # noqa: E402
import credit_report as report  # noqa: E402
import credit_sources  # noqa: E402
from phases import Clock  # noqa: E402
from treg_lightning.errors import ConfigError  # noqa: E402

# "(source, alpha A)": the variant's token-reward source and T-REG strength.
ALL_VARIANTS = (
    "DPO", "DPO + T-REG (spans, alpha 0.25)", "DPO + T-REG (spans, alpha 1)",
    "DPO + T-REG (shuffled spans, alpha 1)", "DPO + T-REG (uniform, alpha 1)",
    "DPO + T-REG (dense signed, alpha 1)", "DPO (minimal pairs)",
    "DPO + T-REG (two-model, alpha 1)",
    "SimPO", "SimPO + T-REG (spans, alpha 1)", "DPO + T-REG (instruct)", "DPO + T-REG (revise)",
)  # fmt: skip
GATED = "DPO + T-REG (two-model, alpha 1)"  # run once the oracle shows an effect

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
    variants: tuple[str, ...] = ALL_VARIANTS[:8]
    seeds: int = 5
    lora_rank: int = 16
    lora_layers: int | None = None  # adapters on the top this many decoder layers (None: all)
    alpha: float = 0.25  # T-REG strength of a variant that names none (the paper's 0.25)
    dense_positive: float = 0.1  # the dense signed control's value off the defect
    two_model: str = "if-effect"  # "if-effect" | "always" | "never"
    sft_steps: int = 0  # two-model rewards: fine-tuning steps of each LoRA copy
    sft_lr: float = 5e-4
    unseen_kind: str | None = "irrelevant"  # data: the kind only held-out pairs carry
    precision: str = "32-true"
    torch_dtype: str = "float32"
    accelerator: str = "cpu"
    save_policies: bool = False  # export each trained policy (merged) into the work dir


SIZES = {
    # 5 seeds x 8 variants x 48 steps of 2 pairs (one epoch of 96 training pairs) at <= 96
    # tokens, 48 held-out pairs, LoRA rank 16 on the top 8 of 30 layers, reference log-probs
    # computed once; each of the two models gets 96 steps of one answer. Sized for 60-90 min
    # on 2 idle CPU cores (bench/README.md gives the measured time and load).
    "cpu": Size("smollm2", train_pairs=96, heldout_pairs=48, steps=48, batch_size=2, lr=1e-3,
                max_length=96, max_prompt_length=48, lora_layers=8, sft_steps=96),
    # The same design for a real model on one GPU (not run here: no GPU was lent).
    "gpu": Size("HuggingFaceTB/SmolLM2-1.7B-Instruct", train_pairs=1000, heldout_pairs=300,
                steps=250, batch_size=8, lr=2e-4, max_length=512, max_prompt_length=256,
                sft_steps=500, lora_rank=32, precision="bf16-true", torch_dtype="bfloat16",
                accelerator="gpu"),
    "dry-run": Size("", train_pairs=8, heldout_pairs=8, steps=4, batch_size=2, lr=1e-2,
                    max_length=384, max_prompt_length=96, seeds=2, sft_steps=4,
                    save_policies=True),
}  # fmt: skip


def slug(name: str) -> str:
    for a, b in ((" + ", "-"), (" (", "-"), (")", ""), (", ", "-"), (" ", "-")):
        name = name.replace(a, b)
    return name.lower()


def variant_parts(name: str) -> list[str]:
    return name.split("(")[1].rstrip(")").split(", ") if "(" in name else []


def variant_alpha(name: str, default: float) -> float:
    """The T-REG strength of a variant: ``alpha A`` in its name, else ``default``."""
    given = [p.removeprefix("alpha ") for p in variant_parts(name) if p.startswith("alpha ")]
    return float(given[0]) if given else default


def source_key(name: str) -> str | None:
    """The token-reward source of a T-REG variant (None without T-REG)."""
    return variant_parts(name)[0] if "T-REG" in name else None


def loss_and_regularizer(name: str, alpha: float):
    from treg_lightning.losses import DPOLoss, SimPOLoss, TokenRewardRegularizer

    loss = (
        DPOLoss(beta=0.1) if name.startswith("DPO") else SimPOLoss(beta=2.0, gamma_beta_ratio=0.5)
    )
    alpha = variant_alpha(name, alpha)
    regularizer = TokenRewardRegularizer(alpha=alpha) if "T-REG" in name else None
    return loss, regularizer


def train_file(name: str, files: dict[str, Path]) -> Path:
    return files["train_minimal"] if "minimal pairs" in name else files["train"]


# --- sources ---------------------------------------------------------------------------------


def make_source(key: str | None, files: dict[str, Path], size: Size, work: Path, notes: dict):
    """The variant's token-reward source (a fresh one per call); None for none."""
    if key is None:
        return None
    cache = str(work / "cache")
    if key in ("spans", "shuffled spans", "uniform", "dense signed"):
        import credit_controls as controls
        from treg_lightning.rewards.spans import SpanRewards

        made = {"spans": lambda: SpanRewards(cache_dir=cache),
                "shuffled spans": lambda: controls.ShuffledSpanRewards(seed=0, cache_dir=cache),
                "uniform": lambda: controls.UniformSpanRewards(cache_dir=cache),
                "dense signed": lambda: controls.DenseSignedSpanRewards(
                    positive=size.dense_positive, cache_dir=cache)}[key]()  # fmt: skip
        notes[key] = f"{type(made).__module__}.{type(made).__name__}({made.settings()})"
        return made
    if key in ("instruct", "revise"):
        from treg_lightning.rewards import ContrastiveRewards

        notes[key] = f"treg_lightning.rewards.ContrastiveRewards(template={key!r})"
        return ContrastiveRewards(template=key, store_reference_logps=False, cache_dir=cache,
                                  progress=False, evaluator_dtype=size.torch_dtype)  # fmt: skip
    if key == "two-model":
        from treg_lightning.rewards.model_contrast import ModelContrastRewards

        positive, negative = two_models(size, files, work)
        notes[key] = (
            "treg_lightning.rewards.model_contrast.ModelContrastRewards(scale=1.0): LoRA copies "
            f"fine-tuned {size.sft_steps} steps (lr {size.sft_lr}) on the train split's chosen "
            "/ rejected answers"
        )
        return ModelContrastRewards(positive=positive, negative=negative, scale=1.0,
                                    dtype=size.torch_dtype, cache_dir=cache)  # fmt: skip
    raise ConfigError(f"unknown token-reward source {key!r}")


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


def tokenized(size: Size, path: Path) -> list[dict]:
    """The rows of ``path`` as the data module tokenizes them (file order, with ``index``)."""
    from treg_lightning.data.datamodule import PreferenceDataModule

    data = PreferenceDataModule(str(path), tokenizer=size.model, max_length=size.max_length,
                                max_prompt_length=size.max_prompt_length, rewards=None,
                                skip_invalid_rows=False)  # fmt: skip
    return data.tokenized_rows()["train"]


def audit(source, size: Size, heldout_path: Path, pairs: list[dict]) -> dict:
    """``treg audit``'s AUROC of ``-r_hat`` at the defect tokens of the held-out rejected
    responses (``audit_rows``' ``auroc_negative``, 95% interval over pairs): the defect tokens
    marked -1, the others unmarked, the end-of-turn token 0 (in neither class)."""
    import numpy as np

    from treg_lightning.data.datamodule import PreferenceDataModule
    from treg_lightning.rewards.audit import audit_rows

    data = PreferenceDataModule(str(heldout_path), tokenizer=size.model,
                                max_length=size.max_length,
                                max_prompt_length=size.max_prompt_length, rewards=source,
                                skip_invalid_rows=False)  # fmt: skip
    rows = data.annotate()["train"]
    marked = [{"chosen_token_rewards": row["chosen_token_rewards"],
               "rejected_token_rewards": row["rejected_token_rewards"],
               "rejected_marks": np.r_[np.where(np.asarray(pair["labels"]) == 1, -1.0, np.nan),
                                       0.0]}
              for pair, row in zip(pairs, rows, strict=True)]  # fmt: skip
    m = audit_rows(marked, bootstrap=400)["metrics"]["auroc_negative"]
    return {"mean": m["value"], "low": m["low"], "high": m["high"]}


# --- training and scoring --------------------------------------------------------------------


def train(size: Size, name: str, seed: int, path: Path, source, work: Path):
    import lightning as L
    import torch
    from lightning.pytorch.loggers import CSVLogger
    from peft import LoraConfig

    from treg_lightning.data.datamodule import PreferenceDataModule
    from treg_lightning.module import PreferenceModule

    loss, regularizer = loss_and_regularizer(name, size.alpha)
    data = PreferenceDataModule(str(path), tokenizer=size.model, max_length=size.max_length,
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


def pair_records(rows: list[dict], pairs: list[dict], tokenizer, train_kinds) -> list[dict]:
    """The held-out pairs' fixed fields: defect labels over the rejected tokens (``SpanRewards``'
    mapping of the negative spans, end-of-turn left out), kind, seen or not."""
    from treg_lightning.rewards.spans import SpanRewards

    spans = SpanRewards()
    out = []
    for row, pair in zip(rows, pairs, strict=True):
        marks = spans.response_marks(row, "rejected", tokenizer)
        out.append({"id": pair["id"], "kind": pair["kind"], "seen": pair["kind"] in train_kinds,
                    "labels": [int(m < 0) for m in marks[:-1]],
                    "rejected_ids": list(row["rejected_ids"][:-1]),
                    "chosen_tokens": len(row["chosen_ids"]) - 1})  # fmt: skip
    return out


_REFERENCE: dict[tuple, dict] = {}


def score(module, rows: list[dict], tokenizer) -> list[dict]:
    """Per held-out pair: ``d_t`` on the rejected and chosen tokens (end-of-turn left out) and
    the pair's margin under the variant's loss, after training and before (policy =
    reference)."""
    import torch

    from treg_lightning.data.collate import PreferenceCollator
    from treg_lightning.models.lora import adapters_disabled
    from treg_lightning.pairs import PairScores, ResponseScores

    module.eval()
    collate = PreferenceCollator(tokenizer.pad_token_id or tokenizer.eos_token_id)
    records = []
    for row in rows:
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

        mask = {s: batch[f"{s}_response_mask"][0] for s in ("chosen", "rejected")}
        delta = {s: (policy[s][0] - reference[s][0])[mask[s]].double().numpy()[:-1] for s in mask}
        records.append({
            "delta": delta["rejected"], "chosen_delta": delta["chosen"],
            "margin": float(module.loss(scores(policy, reference)).margins[0]),
            "margin_before": float(module.loss(scores(reference, reference)).margins[0]),
        })  # fmt: skip
    return records


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


# --- the run ---------------------------------------------------------------------------------


def two_model_gate(size: Size, runs: dict) -> tuple[bool, str]:
    """Whether the two-model variant runs, and why: asked for, and (``if-effect``) the
    oracle's paired credit-share interval (alpha 1 minus DPO, all held-out pairs) above 0."""
    if GATED not in size.variants or size.two_model == "never":
        return False, "not asked for"
    if size.two_model == "always":
        return True, "asked for (--two-model always)"
    if report.ORACLE not in runs or report.BASE not in runs:
        return False, f"needs {report.ORACLE} and {report.BASE} to judge the oracle's effect"
    metric = cm.PAIR_METRICS["credit_share"][0]
    effect = cm.paired_bootstrap(cm.matrix(runs[report.ORACLE], metric),
                                 cm.matrix(runs[report.BASE], metric))  # fmt: skip
    shown = effect["low"] > 0
    return shown, (f"oracle (alpha 1) minus DPO credit share {report.fmt(effect, sign=True)}: "
                   + ("an effect, so the two-model source runs" if shown else
                      "no effect shown, so the two-model source does not run"))  # fmt: skip


def check_out(out: Path, overwrite: bool) -> None:
    if (out / "results.json").exists() and not overwrite:
        raise ConfigError(f"{out}/results.json exists: pass --overwrite to replace it, or "
                          "another --out.")  # fmt: skip
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file, not a folder: name a folder.")


def ensure_data(data_dir: Path, size: Size) -> None:
    """Builds the v2 benchmark into ``data_dir`` if missing; refuses a folder of another
    layout (an earlier v1 build, say) rather than train on it."""
    record_path = data_dir / "fingerprint.json"
    if not (data_dir / "train.jsonl").exists():
        hh = credit_data.HH_RLHF if credit_data.HH_RLHF.exists() else None
        layout = credit_data.Layout("v2", unseen_kind=size.unseen_kind)
        record = credit_data.build(data_dir, 0, hh, layout=layout)
        record_path.write_text(json.dumps(record, indent=1) + "\n")
    layout = (json.loads(record_path.read_text()).get("layout", {"name": "v1"})
              if record_path.exists() else {"name": "unknown"})  # fmt: skip
    if layout.get("name") != "v2":
        raise ConfigError(
            f"--data {data_dir} holds a {layout.get('name')} build of the benchmark; this run "
            "needs the v2 layout: pass another --data folder (built there if missing) or "
            f"rebuild: python bench/credit_data.py --layout v2 --out {data_dir} --overwrite"
        )


def scores_folder(work: Path, size: Size, files: dict) -> Path:
    """Where each (variant, seed)'s held-out scores are kept (:func:`kept_scores`), so an
    interrupted run resumes at the first unscored training. The folder is named by the settings
    and the selected files' bytes: a changed setting or file never reuses an earlier score."""
    import hashlib

    key = json.dumps({"size": asdict(size), "files": {s: hashlib.sha256(p.read_bytes())
                      .hexdigest() for s, p in sorted(files.items())}}, sort_keys=True,
                     default=str)  # fmt: skip
    return work / "scores" / hashlib.sha256(key.encode()).hexdigest()[:16]


def kept_scores(folder: Path, name: str, seed: int) -> Path:
    """The scores file of one (variant, seed) in a :func:`scores_folder`."""
    return folder / f"{slug(name)}-seed{seed}.json"


def load_scores(path: Path) -> list[dict]:
    import numpy as np

    return [{k: np.asarray(v) if isinstance(v, list) else v for k, v in r.items()}
            for r in json.loads(path.read_text())]  # fmt: skip


def keep_scores(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [{k: v.tolist() if hasattr(v, "tolist") else v for k, v in r.items()} for r in records]
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps(rows))
    os.replace(partial, path)


def train_and_score(size, names, files, heldout_rows, tokenizer, work, clock, runs, notes):
    folder = scores_folder(work, size, files)
    for seed in range(size.seeds):
        for name in names:
            kept = kept_scores(folder, name, seed)
            if kept.exists():
                print(f"--- {name}, seed {seed}: scores from {kept}", flush=True)
                runs.setdefault(name, []).append(load_scores(kept))
                continue
            key = source_key(name)
            with clock(f"train: {name}, seed {seed}"):
                source = credit_sources.WithReference(
                    make_source(key, files, size, work, notes), size.model
                )
                module = train(size, name, seed, train_file(name, files), source, work)
            with clock(f"score: {name}, seed {seed}"):
                records = score(module, heldout_rows, tokenizer)
            keep_scores(kept, records)
            runs.setdefault(name, []).append(records)
            if size.save_policies:
                from treg_lightning.models.export import export_module

                export_module(module, work / "policies" / f"{slug(name)}-seed{seed}", tokenizer)
            del module


def run(size: Size, size_name: str, out: Path, work: Path, data_dir: Path, overwrite: bool,
        heldout_file: Path | None = None, command: str = "") -> dict:  # fmt: skip
    import torch

    from treg_lightning.models.loading import load_tokenizer

    check_out(out, overwrite)
    load_before = os.getloadavg()
    clock = Clock()
    tokenizer = load_tokenizer(size.model)
    external = None
    if heldout_file is not None:  # checked before anything is built or trained
        external = credit_pairs.external_heldout(heldout_file, size, tokenizer, work)
    ensure_data(data_dir, size)
    files = credit_pairs.select_pairs(replace(size, heldout_pairs=0) if external else size,
                                      data_dir, work, tokenizer)  # fmt: skip
    files["heldout"] = external or files["heldout"]
    train_kinds = sorted({r["kind"] for r in credit_pairs.read_rows(files["train"])})
    heldout_rows = tokenized(size, files["heldout"])
    pairs = pair_records(heldout_rows, credit_pairs.read_rows(files["heldout"]), tokenizer,
                         train_kinds)  # fmt: skip
    notes: dict[str, str] = {}
    runs: dict[str, list[list[dict]]] = {}
    first = [n for n in size.variants if n != GATED]
    train_and_score(size, first, files, heldout_rows, tokenizer, work, clock, runs, notes)
    merged = {n: [[{**p, **r} for p, r in zip(pairs, rs, strict=True)] for rs in per_seed]
              for n, per_seed in runs.items()}  # fmt: skip
    gated, why = two_model_gate(size, merged)
    print(f"--- two-model variant: {why}", flush=True)
    if gated:
        with clock("source: two-model"):
            make_source("two-model", files, size, work, notes)  # the two fine-tunes, timed apart
        train_and_score(size, [GATED], files, heldout_rows, tokenizer, work, clock, runs, notes)
    out.mkdir(parents=True, exist_ok=True)
    report.save_records(out / "tokens.json.gz", pairs, runs)
    audits = {}
    for key in dict.fromkeys(source_key(n) for n in runs):
        if key is not None:
            with clock(f"audit: {key}"):
                audits[key] = audit(make_source(key, files, size, work, notes), size,
                                    files["heldout"], pairs)  # fmt: skip
    settings = {
        "size": size_name, **asdict(size), "command": command, "sources": notes,
        "two_model": why, "train_kinds": train_kinds,
        "heldout_file": str(heldout_file) if heldout_file else None,
        "data": json.loads((data_dir / "fingerprint.json").read_text())["sha256_all"],
        "selected_sha256": {s: credit_data.hashlib.sha256(p.read_bytes()).hexdigest()
                            for s, p in files.items()},
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "cpus": os.cpu_count(), "torch": torch.__version__,
                    "torch_threads": torch.get_num_threads(),
                    "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
                    "load_average_before": [round(x, 2) for x in load_before],
                    "load_average_after": [round(x, 2) for x in os.getloadavg()]},
        "wall_minutes": round(sum(clock.seconds.values()) / 60, 1),
    }  # fmt: skip
    (out / "settings.json").write_text(json.dumps(settings, indent=1) + "\n")
    (out / "timings.json").write_text(json.dumps(clock.seconds, indent=1) + "\n")
    extras = {"audit": audits, "training": training_summary(work, list(runs), size.seeds)}
    (out / "extras.json").write_text(json.dumps(extras, indent=1) + "\n")
    return write_report(out, out, tokenizer)


def header(settings: dict) -> str:
    layers = (f"top {settings['lora_layers']} layers" if settings["lora_layers"]
              else "all layers")  # fmt: skip
    m = settings["machine"]
    return (f"`{settings['command']}`: {settings['model']}, LoRA rank {settings['lora_rank']} "
            f"({layers}), {settings['steps']} steps x {settings['batch_size']} pairs, lr "
            f"{settings['lr']}, max_length {settings['max_length']}, {settings['train_pairs']} "
            f"train pairs, {settings['seeds']} seeds; held-out: "
            f"{settings['heldout_file'] or str(settings['heldout_pairs']) + ' built pairs'}; "
            f"trained kinds {settings['train_kinds']}. Two-model variant: "
            f"{settings['two_model']}. Wall time {settings['wall_minutes']} min on "
            f"{m['cpus']} CPUs ({m['processor'] or m['platform']}), torch threads "
            f"{m['torch_threads']} (OMP_WAIT_POLICY {m.get('omp_wait_policy')}), load average "
            f"{m['load_average_before'][0]} before, "
            f"{m['load_average_after'][0]} after.")  # fmt: skip


def write_report(saved: Path, out: Path, tokenizer=None) -> dict:
    """Every table and plot from ``saved``'s ``tokens.json.gz``, ``settings.json`` and
    ``extras.json``, written to ``out``: the same figures whether right after the run or
    later."""
    import credit_plots

    settings = json.loads((saved / "settings.json").read_text())
    extras = json.loads((saved / "extras.json").read_text())
    runs = report.load_records(saved / "tokens.json.gz")
    table = report.tables(runs)
    out.mkdir(parents=True, exist_ok=True)
    results = {"settings": settings, **table, **extras}
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "results.md").write_text(report.markdown(table, header(settings), extras["audit"],
                                                    extras["training"]))  # fmt: skip
    credit_plots.credit_share(table, out / "credit_share.png")
    credit_plots.collateral(table, out / "collateral.png")
    if report.ORACLE in runs and tokenizer is not None:
        credit_plots.heatmaps(runs[report.BASE][0], runs[report.ORACLE][0], report.BASE,
                              report.ORACLE, tokenizer, out / "heatmaps.png")  # fmt: skip
    print((out / "results.md").read_text())
    return results


def reaudit(saved: Path, out: Path, work: Path) -> None:
    """Copy ``saved``'s settings and records into ``out`` with the audit rows recomputed by
    :func:`audit` (this checkout's ``treg audit`` definitions) on ``work``'s held-out pairs, for
    every source the run trained with."""
    import gzip
    import shutil

    settings = json.loads((saved / "settings.json").read_text())
    size = Size(**{k: v for k, v in settings.items() if k in Size.__dataclass_fields__})
    heldout = work / "pairs" / "heldout.jsonl"
    if not heldout.is_file():
        raise ConfigError(f"--reaudit needs the run's held-out pairs: {heldout} is missing; give "
                          "the run's --work-dir.")  # fmt: skip
    with gzip.open(saved / "tokens.json.gz", "rt", encoding="utf-8") as f:
        records = json.load(f)
    extras = json.loads((saved / "extras.json").read_text())
    extras["audit"] = {key: audit(make_source(key, {}, size, work, {}), size, heldout,
                                  records["pairs"])
                       for key in extras["audit"]}  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    for name in ("settings.json", "timings.json", "tokens.json.gz"):
        if (saved / name).resolve() != (out / name).resolve():
            shutil.copy2(saved / name, out / name)
    (out / "extras.json").write_text(json.dumps(extras, indent=1) + "\n")


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
    parser.add_argument("--size", choices=tuple(SIZES), default="cpu")
    parser.add_argument("--out", type=Path, required=True, help="results folder")
    parser.add_argument("--work-dir", type=Path, default=Path("outputs/credit_run"))
    parser.add_argument(
        "--data",
        type=Path,
        default=Path("outputs/credit-v2"),
        help="folder of the built v2 benchmark (built there if missing)",
    )
    parser.add_argument(
        "--heldout",
        type=Path,
        default=None,
        help="score on this span-annotated JSONL instead of the built held-out "
        "pairs (the format bench/credit_data.py writes; SpanRewards' spans)",
    )
    parser.add_argument("--report-from", type=Path, default=None,
                        help="a results folder: recompute its tables and plots from its "
                        "tokens.json.gz into --out, without training")  # fmt: skip
    parser.add_argument("--reaudit", action="store_true",
                        help="with --report-from: recompute the token-reward audit rows with "
                        "this checkout's treg audit, from --work-dir's held-out pairs and "
                        "reward caches, before the report")  # fmt: skip
    parser.add_argument("--model", default=None, help="override the size's model")
    parser.add_argument("--seeds", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--max-length", type=int, default=None)
    parser.add_argument("--max-prompt-length", type=int, default=None)
    parser.add_argument("--variants", nargs="*", default=None, choices=ALL_VARIANTS)
    parser.add_argument("--two-model", choices=("if-effect", "always", "never"), default=None,
                        help="run the two-model variant once the oracle shows an effect "
                        "(default), always, or never")  # fmt: skip
    parser.add_argument(
        "--save-policies",
        action="store_true",
        help="export each trained policy (merged) into the work dir",
    )
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    command = "python bench/credit.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    if args.report_from is not None:
        from treg_lightning.models.loading import load_tokenizer

        check_out(args.out, args.overwrite)
        model = json.loads((args.report_from / "settings.json").read_text())["model"]
        if args.reaudit:
            reaudit(args.report_from, args.out, args.work_dir)
            return write_report(args.out, args.out, load_tokenizer(model))
        return write_report(args.report_from, args.out, load_tokenizer(model))
    given = {"model": args.model, "seeds": args.seeds, "steps": args.steps,
             "max_length": args.max_length, "max_prompt_length": args.max_prompt_length,
             "variants": tuple(args.variants) if args.variants else None,
             "two_model": args.two_model, "save_policies": args.save_policies}  # fmt: skip
    size = replace(SIZES[args.size], **{k: v for k, v in given.items() if v})
    work = args.work_dir
    work.mkdir(parents=True, exist_ok=True)
    if args.size == "dry-run":
        size = replace(size, model=build_dry_run(work))
    return run(size, args.size, args.out, work, args.data, args.overwrite, args.heldout, command)


if __name__ == "__main__":
    from treg_lightning.cli.exits import exit_statuses

    with exit_statuses():
        main()
