"""Every run config composed with every strategy file, through `treg fit` with a tiny model, to
its first optimizer steps and its end-of-fit outputs: DDP on one CPU process, FSDP2
(``ModelParallelStrategy``) and FSDP1 (``FSDPStrategy`` on the CPU stand-in device of
``tests/fsdp1_on_cpu.py``) on two gloo processes. Each config keeps its own settings (loss,
token-reward source and its annotate pass, precision, accumulation, clipping, checkpointing,
LoRA, the export) except the model, the data, the device count and the output folders.
`treg pairs` with ``configs/onpolicy_demo.yaml`` runs under each strategy file too."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from builders import (
    byte_tokenizer,
    checkout_env,
    imported_from_checkout,
    run_in_group,
    save_tiny_model,
    tiny_gemma2,
    write_pairs,
)

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
TESTS = Path(__file__).resolve().parents[1]
RUN_CONFIGS = sorted(p.name for p in CONFIGS.glob("*.yaml") if p.name != "onpolicy_demo.yaml")
STRATEGIES = {"ddp.yaml": 1, "fsdp2.yaml": 2, "fsdp1.yaml": 2}  # file: processes
PAIRS = 40

# `python matrix.py spec.json`: for each (strategy, config) of the spec, in turn in the same
# processes (Lightning's launcher re-runs this script as rank 1), `treg fit` in-process; rank 0
# appends what the run did to results.jsonl. Then `treg pairs` once per strategy.
SCRIPT = textwrap.dedent(
    """
    import json
    import os
    import sys
    from pathlib import Path

    import treg_lightning
    from treg_lightning.cli.main import TRegCLI
    from treg_lightning.errors import UserError

    spec = json.loads(Path(sys.argv[1]).read_text())
    root = Path(spec["root"])

    def record(entry):
        with open(root / "results.jsonl", "a") as f:
            f.write(json.dumps(entry) + "\\n")

    for strategy in spec["strategies"]:
        for config in spec["configs"]:
            out = root / f"{strategy}-{config}"
            args = ["fit", "--config", f"{spec['configs_dir']}/{config}",
                    "--config", f"{spec['configs_dir']}/strategy/{strategy}",
                    *spec["strategy_args"][strategy], *spec["config_args"][config],
                    f"--trainer.default_root_dir={out}",
                    f"--trainer.logger.init_args.save_dir={out}"]
            try:
                cli = TRegCLI(args=args)
            except UserError as error:  # refused at start-up, on every process alike
                if os.environ.get("LOCAL_RANK", "0") == "0":
                    record({"strategy": strategy, "config": config, "refused": str(error)})
                continue
            trainer, module = cli.trainer, cli.model
            if trainer.is_global_zero:
                loss = trainer.callback_metrics.get("train/loss_step")
                record({
                    "strategy": strategy, "config": config,
                    "strategy_class": next(  # Lightning's class (FSDP1: under the stand-in)
                        c.__name__ for c in type(trainer.strategy).__mro__
                        if c.__module__.startswith("lightning")
                    ),
                    "world_size": trainer.world_size, "precision": trainer.precision,
                    "global_step": trainer.global_step,
                    "loss": None if loss is None else float(loss),
                    "compute_dtype": str(module.compute_dtype()),
                    "exported": [str(p) for p in out.rglob("policy/*.safetensors")],
                    "treg_lightning": treg_lightning.__file__,
                })
        # The judge of onpolicy_demo.yaml: the policy demo.yaml trained under this strategy.
        judge = root / f"{strategy}-demo.yaml" / "logs" / "version_0" / "policy"
        TRegCLI(args=["pairs", "--config", f"{spec['configs_dir']}/onpolicy_demo.yaml",
                      "--config", f"{spec['configs_dir']}/strategy/{strategy}",
                      *spec["strategy_args"][strategy], *spec["pairs_args"],
                      f"--scorer.init_args.policy={judge}",
                      f"--output.path={root / f'{strategy}-pairs.jsonl'}"])
    """
)


@pytest.fixture(scope="module")
def matrix(tmp_path_factory):
    """The runs of every (strategy file, config); one launch per process count."""
    root = tmp_path_factory.mktemp("matrix")
    tokenizer = byte_tokenizer()
    llama = save_tiny_model(root / "llama", tokenizer)
    gemma = tiny_gemma2(len(tokenizer))
    gemma.config.bos_token_id, gemma.config.eos_token_id = tokenizer.bos_token_id, None
    gemma.save_pretrained(root / "gemma2")
    tokenizer.save_pretrained(root / "gemma2")
    data = write_pairs(root / "pairs.jsonl", PAIRS)
    cache = f"--data.rewards.init_args.cache_dir={root / 'cache'}"

    def config_args(config: str) -> list[str]:
        model = root / ("gemma2" if config.startswith("gemma2") else "llama")
        args = [f"--model.model={model}", f"--data.source={data}", "--data.num_workers=0",
                "--trainer.accelerator=cpu", "--trainer.max_steps=2",
                "--trainer.val_check_interval=1.0", "--trainer.enable_progress_bar=false",
                "--trainer.enable_model_summary=false", cache]  # fmt: skip
        if "val_split" in yaml.safe_load((CONFIGS / config).read_text())["data"]:
            args.append("--data.val_split=null")  # the pairs file has one split
        return args

    spec = {
        "root": str(root),
        "configs_dir": str(CONFIGS),
        "configs": RUN_CONFIGS,
        "config_args": {config: config_args(config) for config in RUN_CONFIGS},
        "strategy_args": {
            name: [f"--trainer.devices={devices}", "--trainer.num_nodes=1"]
            + (
                ["--trainer.strategy.class_path=fsdp1_on_cpu.CPUFSDPStrategy"]
                if name == "fsdp1.yaml"
                else []
            )  # fmt: skip
            for name, devices in STRATEGIES.items()
        },
        "pairs_args": [
            f"--model.model={llama}",
            f"--data.source={data}",
            "--data.limit=2",
            "--trainer.accelerator=cpu",
            "--sampling.max_new_tokens=4",
            f"--scorer.init_args.reference={llama}",
        ],  # fmt: skip
        "llama": str(llama),
        "gemma2": str(root / "gemma2"),
    }
    script = root / "matrix.py"
    script.write_text(SCRIPT)
    env = checkout_env(TESTS, OMP_NUM_THREADS="1")
    for devices in sorted(set(STRATEGIES.values())):
        spec["strategies"] = [name for name, n in STRATEGIES.items() if n == devices]
        path = root / f"spec-{devices}.json"
        path.write_text(json.dumps(spec))
        run_in_group([sys.executable, str(script), str(path)], 600, env)
    results = [json.loads(line) for line in (root / "results.jsonl").read_text().splitlines()]
    return spec, {(r["strategy"], r["config"]): r for r in results}


EXPECTED = {
    # strategy file: (strategy class, world size, precision, compute dtype of the policy)
    "ddp.yaml": ("DDPStrategy", 1, "32-true", "torch.float32"),
    "fsdp2.yaml": ("ModelParallelStrategy", 2, "32-true", "torch.bfloat16"),
    "fsdp1.yaml": ("FSDPStrategy", 2, "bf16-mixed", "torch.bfloat16"),
}


@pytest.mark.gpu_emulation
@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
@pytest.mark.parametrize("config", RUN_CONFIGS)
def test_config_with_strategy_trains_a_step_and_exports(matrix, config, strategy):
    """The composed run took two optimizer steps (the configs' warm-up gives the first a learning
    rate of 0) with the strategy and precision the two files give, with a finite loss, and
    exported a policy whose weights moved from the initial model's. LoRA under FSDP1 is refused
    at start-up, naming the strategies that train it."""
    spec, results = matrix
    result = results[strategy, config]
    if (strategy, config) == ("fsdp1.yaml", "demo_lora.yaml"):
        assert "FSDPStrategy (FSDP1)" in result["refused"]
        assert "configs/strategy/fsdp2.yaml" in result["refused"]
        return
    assert imported_from_checkout(result["treg_lightning"])
    assert (result["strategy_class"], result["world_size"], result["precision"],
            result["compute_dtype"]) == EXPECTED[strategy]  # fmt: skip
    assert result["global_step"] == 2
    assert result["loss"] is not None and torch.isfinite(torch.tensor(result["loss"]))
    (exported,) = result["exported"]
    initial = load_file(str(Path(spec["gemma2" if config.startswith("gemma2") else "llama"])
                            / "model.safetensors"))  # fmt: skip
    policy = load_file(exported)
    # Sharded exports also write a tied head (Gemma-2's) under its own name: the same tensor.
    assert set(policy) - set(initial) <= {"lm_head.weight"} and set(initial) <= set(policy)
    if "lm_head.weight" not in initial and "lm_head.weight" in policy:
        assert torch.equal(policy["lm_head.weight"], policy["model.embed_tokens.weight"])
    moved = [k for k in initial if not torch.equal(policy[k].float(), initial[k].float())]
    assert moved, "the exported policy equals the initial model: no optimizer step moved it"


@pytest.mark.gpu_emulation
@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_onpolicy_pairs_with_strategy(matrix, strategy):
    """`treg pairs --config configs/onpolicy_demo.yaml` with each strategy file, judged by the
    demo policy trained under it: the 2 prompts asked for, each with the config's 4 samples,
    and a pair (chosen and rejected differing) for every prompt not dropped."""
    spec, _ = matrix
    root = Path(spec["root"])
    rows = [json.loads(line) for line in (root / f"{strategy}-pairs.jsonl").open()]
    summary = json.loads((root / f"{strategy}-pairs.summary.json").read_text())
    assert summary["prompts"] == 2 and summary["samples"] == 8
    assert summary["kept"] == len(rows) >= 1
    assert all(row["chosen"] != row["rejected"] for row in rows)
