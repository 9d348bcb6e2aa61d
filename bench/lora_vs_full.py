"""The CPU demo trained two ways, side by side: every weight (configs/demo.yaml) and rank-16 LoRA
adapters (configs/demo_lora.yaml), from the same token-reward cache, seed and data.

Each run is one ``treg fit`` in its own process; reported per run: wall time, peak resident
memory of the training process, the weights its last checkpoint holds and its size, the train
loss at the first and last step, and the validation loss and reward accuracy at the end. The
annotate pass runs once before both (``treg annotate``) and is not in either time.

    python bench/lora_vs_full.py                 # ~5 min on 2 CPU cores
    python bench/lora_vs_full.py --out bench/results/lora_vs_full.json

Wall times on a shared machine move with its load: compare them as a ratio within one run (the
load average before and after is recorded).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUNS = {"full": "configs/demo.yaml", "lora": "configs/demo_lora.yaml"}

# Runs `treg fit` as a child and prints the child's peak RSS (KiB on Linux) on its last line:
# a fresh process per run, so one run's peak never counts for the other.
_PEAK = (
    "import resource, subprocess, sys\n"
    "code = subprocess.run(sys.argv[1:]).returncode\n"
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
    "sys.exit(code)\n"
)


def treg(*args: str) -> list[str]:
    return [sys.executable, "-m", "treg_lightning.cli.main", *args]


def train(name: str, config: str, work: Path) -> dict:
    root = work / name
    command = treg(
        "fit",
        "--config",
        str(ROOT / config),
        f"--trainer.default_root_dir={root}",
        f"--trainer.logger.init_args.save_dir={root}",
        "--trainer.enable_progress_bar=false",
    )
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", _PEAK, *command], cwd=ROOT, capture_output=True, text=True
    )
    wall = time.perf_counter() - start
    if done.returncode != 0:
        sys.stderr.write(done.stderr[-4000:])
        raise SystemExit(f"{name}: treg fit exited with {done.returncode}")
    peak_kib = int(done.stdout.strip().splitlines()[-1])
    run = sorted((root / "logs").glob("version_*"), key=lambda p: int(p.name.split("_")[1]))[-1]
    return {
        "config": config,
        "wall_s": round(wall, 1),
        "peak_rss_gib": round(peak_kib / 2**20, 2),
        "checkpoint_parameters_m": checkpoint_parameters(run / "checkpoints" / "last.ckpt"),
        "checkpoint_mib": round((run / "checkpoints" / "last.ckpt").stat().st_size / 2**20, 1),
        **losses(run / "metrics.csv"),
        "run": str(run),
    }


def checkpoint_parameters(path: Path) -> float:
    """Millions of weights in the checkpoint's state dict: the trained ones (a LoRA checkpoint
    holds its adapters only; a full one every policy weight)."""
    import torch

    state = torch.load(path, weights_only=True, map_location="cpu")["state_dict"]
    unique = {t.untyped_storage().data_ptr(): t.numel() for t in state.values()}  # tied once
    return round(sum(unique.values()) / 1e6, 2)


def losses(metrics: Path) -> dict:
    from treg_lightning.answers.plots import read_metrics

    series = read_metrics(metrics)
    train = [value for _, value in series.get("train/loss_step", [])]
    val_loss, val_accuracy = series.get("val/loss"), series.get("val/reward_accuracy")
    if not train or not val_loss or not val_accuracy:
        raise SystemExit(f"{metrics}: no train/loss_step or val/loss rows")
    return {
        "train_loss_first": round(train[0], 4),
        "train_loss_last": round(train[-1], 4),
        "train_steps": len(train),
        "val_loss": round(val_loss[-1][1], 4),
        "val_reward_accuracy": round(val_accuracy[-1][1], 3),
    }


def table(results: dict) -> str:
    keys = [
        ("wall_s", "wall (s)"),
        ("peak_rss_gib", "peak RSS (GiB)"),
        ("checkpoint_parameters_m", "weights in the checkpoint (M)"),
        ("checkpoint_mib", "last.ckpt (MiB)"),
        ("train_loss_first", "train loss, step 0"),
        ("train_loss_last", "train loss, last step"),
        ("val_loss", "val loss"),
        ("val_reward_accuracy", "val reward accuracy"),
    ]
    names = list(results["runs"])
    lines = ["| | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for key, label in keys:
        values = " | ".join(str(results["runs"][n][key]) for n in names)
        lines.append(f"| {label} | {values} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work-dir", default=str(ROOT / "outputs" / "bench_lora_vs_full"))
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args()
    work = Path(args.work_dir)
    shutil.rmtree(work, ignore_errors=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    annotate = treg("annotate", "--config", str(ROOT / RUNS["full"]))
    subprocess.run(annotate, cwd=ROOT, check=True, capture_output=True)
    results = {
        "machine": f"{platform.node()}: {os.cpu_count()} CPU cores, {platform.machine()}",
        "load_average_before": [round(x, 2) for x in os.getloadavg()],
        "runs": {name: train(name, config, work) for name, config in RUNS.items()},
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
    }
    full, lora = results["runs"]["full"], results["runs"]["lora"]
    results["lora_over_full"] = {
        "wall": round(lora["wall_s"] / full["wall_s"], 2),
        "peak_rss": round(lora["peak_rss_gib"] / full["peak_rss_gib"], 2),
        "checkpoint": round(lora["checkpoint_mib"] / full["checkpoint_mib"], 3),
    }
    print(table(results))
    print(json.dumps(results["lora_over_full"]), "load", results["load_average_before"])
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
