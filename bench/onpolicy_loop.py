"""Two rounds of iterative on-policy T-REG on CPU with SmolLM2-135M-Instruct (docs/onpolicy.md).

    judge: a DPO LoRA fit on the first 40 demo pairs (its implicit reward scores the samples)
    round r: treg pairs (policy r, 8 held-out demo prompts, k = 3, 48 new tokens, the shipped
             configs/onpolicy_demo.yaml) -> treg fit (configs/demo_lora.yaml: annotate the new
             pairs, DPO + T-REG LoRA, one epoch) -> policy r + 1 (the merged export)

Reported per round: prompts kept, dropped per reason, the mean chosen - rejected score margin,
the fit's steps and its held-out reward accuracy (8 hand-written demo pairs, rows 100-107,
seen by no fit), and wall times. Every stage is one ``treg`` process.

    python bench/onpolicy_loop.py                          # ~15 min on 2 idle CPU cores
    python bench/onpolicy_loop.py --out bench/results/onpolicy
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "src" / "treg_lightning" / "data" / "demo" / "pairs.jsonl"
SEEDS = [13, 21, 42]  # k = 3 samples per prompt (the demo config's k = 4, cut for time)
PROMPT_ROWS = range(40, 48)  # not among the judge's 40 training pairs
HELDOUT_ROWS = range(100, 108)


def treg(*args: str, log: Path) -> float:
    """Run one ``treg`` subcommand in its own process; its output goes to ``log``."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "2"}
    command = [sys.executable, "-m", "treg_lightning.cli.main", *args]
    start = time.perf_counter()
    with log.open("w") as out:
        done = subprocess.run(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"{' '.join(args[:3])} failed ({done.returncode}); see {log}")
    return round(wall, 1)


def last_metric(log_dir: Path, name: str) -> float | None:
    files = sorted(log_dir.rglob("metrics.csv"))
    value = None
    for row in csv.DictReader(files[-1].open()) if files else []:
        if row.get(name):
            value = float(row[name])
    return value


def fit_args(work: Path, name: str) -> list[str]:
    return [
        f"--trainer.default_root_dir={work / name}",
        f"--trainer.logger.init_args.save_dir={work / name}",
        "--trainer.enable_progress_bar=false",
        "--trainer.max_steps=-1",
        "--trainer.max_epochs=1",
        "--trainer.val_check_interval=1.0",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="outputs/onpolicy_loop", help="scratch folder")
    parser.add_argument("--out", default="bench/results/onpolicy", help="results folder")
    parser.add_argument("--rounds", type=int, default=2)
    options = parser.parse_args()
    work, out = (ROOT / options.work), (ROOT / options.out)
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    rows = [json.loads(line) for line in DEMO.read_text().splitlines()]
    prompts = work / "prompts.jsonl"
    (work / "round0").mkdir(exist_ok=True)
    prompts.write_text("".join(json.dumps(rows[i]["prompt"]) + "\n" for i in PROMPT_ROWS))
    heldout = work / "heldout.jsonl"
    heldout.write_text("".join(json.dumps({k: rows[i][k] for k in ("prompt", "chosen",
                       "rejected")}) + "\n" for i in HELDOUT_ROWS))  # fmt: skip
    started = time.perf_counter()
    record: dict = {
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "load_before": os.getloadavg(),
        },  # fmt: skip
        "setup": {
            "prompts": f"demo rows {PROMPT_ROWS.start}-{PROMPT_ROWS.stop - 1}",
            "heldout": f"demo rows {HELDOUT_ROWS.start}-{HELDOUT_ROWS.stop - 1}",
            "k": len(SEEDS),
            "seeds": SEEDS,
            "max_new_tokens": 48,
            "temperature": 0.8,
            "top_p": 0.95,
        },  # fmt: skip
        "rounds": [],
    }
    # The judge: plain DPO with LoRA (reference = adapters off), no token rewards.
    judge = work / "judge" / "logs" / "version_0" / "policy"
    wall = None  # an earlier run's judge is reused
    if not (judge / "config.json").is_file():
        wall = treg(
            "fit", "--config", "configs/demo_lora.yaml", "--data.rewards=null",
            "--model.regularizer.alpha=0", "--model.live_reference=null",
            "--trainer.max_steps=10", "--trainer.val_check_interval=10",
            *fit_args(work, "judge")[:3], log=work / "judge.log",
        )  # fmt: skip
    record["judge"] = {
        "policy": str(judge.relative_to(ROOT)),
        "wall_s": wall,
        "val_reward_accuracy": last_metric(work / "judge", "val/reward_accuracy"),
    }
    policy = "smollm2"
    for r in range(options.rounds):
        name = f"round{r}"
        pairs = work / name / "pairs.jsonl"
        pairs_wall = treg(
            "pairs", "--config", "configs/onpolicy_demo.yaml", f"--model.model={policy}",
            f"--prompts.file={prompts}", f"--output.path={pairs}",
            f"--scorer.init_args.policy={judge}", f"--pairs.seeds={SEEDS}",
            "--generation.progress=false", log=work / f"{name}-pairs.log",
        )  # fmt: skip
        summary = json.loads(pairs.with_name("pairs.summary.json").read_text())
        fit_wall = treg(
            "fit", "--config", "configs/demo_lora.yaml", f"--model.model={policy}",
            f"--data.source={pairs}", "--data.limit=null", "--data.val_fraction=0",
            f"--data.val_source={heldout}", f"--data.rewards.init_args.cache_dir={work / 'cache'}",
            *fit_args(work, name), log=work / f"{name}-fit.log",
        )  # fmt: skip
        logs = work / name / "logs"
        record["rounds"].append({
            "round": r,
            "policy": policy,
            "prompts": summary["prompts"],
            "kept": summary["kept"],
            "dropped": summary["dropped"],
            "mean_margin": summary["mean_margin"],
            "hit_max_new_tokens": f"{summary['hit_max_new_tokens']} of {summary['samples']}",
            "fit_steps": -(-summary["kept"] // 2),  # one epoch, batches of 2
            "heldout_reward_accuracy": last_metric(logs, "val/reward_accuracy"),
            "heldout_margin": last_metric(logs, "val/margin"),
            "pairs_wall_s": pairs_wall,
            "fit_wall_s": fit_wall,
        })  # fmt: skip
        policy = str(logs / "version_0" / "policy")
        (out / f"{name}.summary.json").write_text(json.dumps(summary, indent=1) + "\n")
        (out / f"{name}.pairs.jsonl").write_text(pairs.read_text())
    record["wall_s"] = round(time.perf_counter() - started, 1)
    record["machine"]["load_after"] = os.getloadavg()
    (out / "loop.json").write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
