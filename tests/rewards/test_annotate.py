"""The annotate pass: values against a plain full-logits forward, batching invariance, shared
response ids, resumability (exception and SIGKILL) and a 2-process gloo run in which each rank
scores exactly its own chunks."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch

from builders import SIDES, Annotator, checkout_env, imported_from_checkout
from treg_lightning.rewards import annotate as annotate_mod
from treg_lightning.rewards.annotate import check_same_vocab
from treg_lightning.rewards.prompts import get_template


def _full_logits_response_logps(model, context: list[int], response: list[int]) -> torch.Tensor:
    """Independent reference: one unpadded forward, log_softmax over the full vocabulary."""
    ids = torch.tensor([context + response])
    with torch.no_grad():
        logps = model(input_ids=ids).logits.float().log_softmax(-1)[0]
    n = len(context)
    # Token at position t is predicted from position t - 1.
    return logps[n - 1 : n - 1 + len(response)].gather(-1, torch.tensor(response)[:, None])[:, 0]


def _table(ds: datasets.Dataset):
    return ds.data.table


def test_rewards_match_independent_full_logits(rw_model, rw_tokenizer, rw_rows, tmp_path):
    annotator = Annotator("revise", batch_size=4)
    ds = annotator(rw_model, rw_tokenizer, rw_rows, tmp_path / "work")
    template = get_template("revise")
    for i, row in enumerate(rw_rows):
        for side in ("chosen", "rejected"):
            better, worse = template.build(rw_tokenizer, row["prompt"], row[side])
            diff = _full_logits_response_logps(rw_model, better, row[f"{side}_ids"]) - (
                _full_logits_response_logps(rw_model, worse, row[f"{side}_ids"])
            )
            expected = torch.sigmoid(diff) - 0.5
            got = torch.tensor(ds[i][f"{side}_token_rewards"])
            torch.testing.assert_close(got, expected, atol=2e-6, rtol=1e-5)
            ref = _full_logits_response_logps(rw_model, row["prompt_ids"], row[f"{side}_ids"])
            torch.testing.assert_close(torch.tensor(ds[i][f"{side}_ref_token_logps"]), ref)
            assert ds[i][f"{side}_ids"] == row[f"{side}_ids"]
    assert ds["index"] == [10, 11, 12]
    assert ds["prompt_ids"] == [r["prompt_ids"] for r in rw_rows]
    assert ds.features["chosen_token_rewards"].feature.dtype == "float32"


def test_batched_equals_one_by_one(rw_model, rw_tokenizer, rw_rows, tmp_path):
    batched = Annotator(batch_size=5, chunk_pairs=3)
    single = Annotator(batch_size=1, chunk_pairs=1)
    a = batched(rw_model, rw_tokenizer, rw_rows, tmp_path / "a")
    b = single(rw_model, rw_tokenizer, rw_rows, tmp_path / "b")
    columns = [f"{side}_{name}" for side in SIDES for name in ("token_rewards", "ref_token_logps")]
    for column in columns:
        for x, y in zip(a[column], b[column], strict=True):
            np.testing.assert_allclose(x, y, atol=1e-5)
    assert single.stats["forwards"] == 3 * 6  # 2 responses x 3 contexts, one per forward
    assert batched.stats["forwards"] == -(-18 // 5)


def test_response_ids_identical_across_contexts(rw_model, rw_tokenizer, rw_rows, monkeypatch):
    seen = []

    def spy(model, sequences, *args, **kwargs):
        seen.extend(sequences)
        return [np.zeros(len(r), np.float32) for _, r in sequences]

    monkeypatch.setattr(annotate_mod, "score_sequences", spy)
    Annotator("instruct").scorer.score(rw_model, rw_tokenizer, rw_rows[:1])
    row = rw_rows[0]
    contexts = [c for c, r in seen if r == row["chosen_ids"]]
    assert len(seen) == 6 and len(contexts) == 3
    assert row["prompt_ids"] in contexts  # plain prompt for the reference logps
    assert all(r in (row["chosen_ids"], row["rejected_ids"]) for _, r in seen)


def test_no_reference_logps_when_disabled(rw_model, rw_tokenizer, rw_rows, tmp_path):
    annotator = Annotator(store_reference_logps=False)
    ds = annotator(rw_model, rw_tokenizer, rw_rows, tmp_path)
    assert "chosen_ref_token_logps" not in ds.column_names
    assert annotator.stats["forwards"] == 2  # 3 pairs x 2 responses x 2 contexts, batch 8
    assert all(-0.5 < v < 0.5 for r in ds["chosen_token_rewards"] for v in r)


class _Interrupt(Exception):
    pass


def test_resume_after_interruption_is_identical_and_skips_done_chunks(
    rw_model, rw_tokenizer, rw_helpers, tmp_path
):
    rows = rw_helpers.make_rows(rw_tokenizer, 7)  # chunks of 2 pairs: 4 chunks (2, 2, 2, 1)

    def annotator():
        return Annotator(batch_size=3, chunk_pairs=2)

    reference = annotator()(rw_model, rw_tokenizer, rows, tmp_path / "uninterrupted")

    def stop_after_chunk_1(c):
        if c == 1:
            raise _Interrupt

    first = annotator()
    with pytest.raises(_Interrupt):
        first(rw_model, rw_tokenizer, rows, tmp_path / "work", on_chunk_done=stop_after_chunk_1)
    assert sorted(p.name for p in (tmp_path / "work").iterdir()) == [
        "chunk-000000.safetensors",
        "chunk-000001.safetensors",
    ]
    second = annotator()
    resumed = second(rw_model, rw_tokenizer, rows, tmp_path / "work")
    assert second.stats["chunks_done"] == 2
    assert second.stats["forwards"] == 4 + 2  # chunk 2: 12 sequences / 3; chunk 3: 6 / 3
    assert _table(resumed).equals(_table(reference))


def test_changed_rows_recompute_their_chunk(rw_model, rw_tokenizer, rw_helpers, tmp_path):
    rows = rw_helpers.make_rows(rw_tokenizer, 4)
    Annotator(chunk_pairs=2)(rw_model, rw_tokenizer, rows, tmp_path)
    rows[3] = {**rows[3], "chosen_ids": rows[3]["chosen_ids"][:-2] + rows[3]["chosen_ids"][-1:]}
    again = Annotator(chunk_pairs=2)
    ds = again(rw_model, rw_tokenizer, rows, tmp_path)
    assert again.stats["chunks_done"] == 1
    assert len(ds[3]["chosen_token_rewards"]) == len(rows[3]["chosen_ids"])


def test_check_same_vocab(rw_tokenizer, rw_helpers):
    check_same_vocab(rw_tokenizer, rw_helpers.build_tokenizer())
    other = rw_helpers.build_tokenizer()
    other.add_tokens(["<extra>"])
    with pytest.raises(ValueError, match="tokenizer differs from the data tokenizer"):
        check_same_vocab(rw_tokenizer, other, "evaluator")


def test_world_size_without_process_group_is_refused(rw_model, rw_tokenizer, rw_rows, tmp_path):
    with pytest.raises(RuntimeError, match="needs torch.distributed initialized"):
        Annotator()(rw_model, rw_tokenizer, rw_rows, tmp_path, rank=0, world_size=2)


# Subprocess script: builds the same tiny model/tokenizer/rows as the fixtures (same seed).
_SCRIPT = textwrap.dedent(
    """
    import importlib.util, json, os, signal, sys
    sys.path.insert(0, {tests!r})
    import torch
    import torch.distributed as dist
    import torch.multiprocessing as mp
    from builders import SIDES, Annotator, checkout_env, imported_from_checkout

    _spec = importlib.util.spec_from_file_location("rw_conftest", {conftest!r})
    _conftest = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(_conftest)
    build_model, build_tokenizer = _conftest.build_model, _conftest.build_tokenizer
    make_rows = _conftest.make_rows

    OUT = {out!r}

    def setup():
        torch.set_num_threads(1)
        tok = build_tokenizer()
        return build_model(len(tok)), tok, make_rows(tok, 7)

    def annotator():
        return Annotator(batch_size=3, chunk_pairs=2)

    def worker(rank, world_size):
        dist.init_process_group("gloo", init_method="file://" + OUT + "/pg", rank=rank,
                                world_size=world_size)
        model, tok, rows = setup()
        mine = annotator()
        ds = mine(model, tok, rows, OUT + "/work2")
        import treg_lightning
        with open(OUT + f"/chunks-rank{{rank}}.json", "w") as f:
            json.dump({{"chunks": mine.chunks, "treg_lightning": treg_lightning.__file__}}, f)
        if rank == 0:
            ds.save_to_disk(OUT + "/two")
        dist.destroy_process_group()

    if __name__ == "__main__":
        mode = sys.argv[1]
        if mode == "kill":
            model, tok, rows = setup()
            def die(c):
                if c == 1:
                    os.kill(os.getpid(), signal.SIGKILL)
            annotator()(model, tok, rows, OUT + "/killed", on_chunk_done=die)
        elif mode == "single":
            model, tok, rows = setup()
            annotator()(model, tok, rows, OUT + "/work1").save_to_disk(OUT + "/one")
        else:
            mp.spawn(worker, args=(2,), nprocs=2)
    """
)


def _run_script(tmp_path: Path, mode: str) -> subprocess.CompletedProcess:
    script = tmp_path / "annotate_script.py"
    conftest = str(Path(__file__).resolve().parent / "conftest.py")
    tests = str(Path(__file__).resolve().parents[1])
    script.write_text(_SCRIPT.format(conftest=conftest, tests=tests, out=str(tmp_path)))
    # The checkout under test, not an installed copy, is what the script must import.
    env = checkout_env(OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, str(script), mode], capture_output=True, text=True, env=env, timeout=240
    )


@pytest.fixture(scope="module")
def single_process_run(tmp_path_factory) -> datasets.Dataset:
    """An uninterrupted 1-process run of the script (7 pairs, chunks of 2), shared."""
    out = tmp_path_factory.mktemp("single")
    single = _run_script(out, "single")
    assert single.returncode == 0, single.stderr[-2000:]
    return datasets.load_from_disk(str(out / "one"))


def test_sigkill_then_rerun_equals_uninterrupted(
    rw_tokenizer, rw_helpers, single_process_run, tmp_path
):
    killed = _run_script(tmp_path, "kill")
    assert killed.returncode == -9, killed.stderr[-2000:]
    done = sorted(p.name for p in (tmp_path / "killed").iterdir())
    assert done == ["chunk-000000.safetensors", "chunk-000001.safetensors"]
    # Rerun in this process on the same folder (same thread count as the script).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = rw_helpers.build_model(len(rw_tokenizer))
        rows = rw_helpers.make_rows(rw_tokenizer, 7)
        rerun = Annotator(batch_size=3, chunk_pairs=2)
        resumed = rerun(model, rw_tokenizer, rows, tmp_path / "killed")
    finally:
        torch.set_num_threads(threads)
    assert rerun.stats["chunks_done"] == 2
    assert _table(resumed).equals(_table(single_process_run))


def test_two_process_gloo_equals_single_process(single_process_run, tmp_path):
    two = _run_script(tmp_path, "two")
    assert two.returncode == 0, two.stderr[-2000:]
    two_ds = datasets.load_from_disk(str(tmp_path / "two"))
    assert _table(two_ds).equals(_table(single_process_run))
    assert len(two_ds) == 7 and two_ds[6]["index"] == 16
    # 7 pairs in chunks of 2 = chunks 0..3: rank r scores exactly the chunks c % 2 == r.
    records = [json.loads((tmp_path / f"chunks-rank{r}.json").read_text()) for r in (0, 1)]
    assert [record["chunks"] for record in records] == [[0, 2], [1, 3]]
    assert all(imported_from_checkout(record["treg_lightning"]) for record in records)


HAND_PAIRS = [
    (
        "What is the capital of France?",
        "The capital of France is Paris.",
        "The capital of France is Berlin, a city famous for its sausages and the river Thames.",
    ),
    (
        "How many days are there in a week?",
        "There are seven days in a week.",
        "Banana purple seventeen the week is when cars sleep under a cloud of numbers.",
    ),
    (
        "What is 2 + 2?",
        "2 + 2 = 4.",
        "2 + 2 = 5. This is because numbers are very large and when you add them they grow "
        "bigger than expected, so the answer is five, or perhaps six.",
    ),
]


@pytest.mark.slow
def test_smollm2_rewards_on_hand_written_pairs(rw_helpers, tmp_path):
    """SmolLM2-135M's contrastive signal is weak: with the instruct preset chosen beats rejected
    on 2 of these 3 pairs (the gibberish one by the widest margin), so that is what is asserted,
    next to the plain-prompt reference logps, which separate every pair by > 1 nat/token."""
    from treg_lightning.models.loading import load_causal_lm, load_tokenizer

    tokenizer, model = load_tokenizer("smollm2"), load_causal_lm("smollm2")
    rows = [
        rw_helpers.tokenize_pair(
            tokenizer, {"prompt": [{"role": "user", "content": q}], "chosen": c, "rejected": r}, i
        )
        for i, (q, c, r) in enumerate(HAND_PAIRS)
    ]
    ds = Annotator("instruct", batch_size=6)(model, tokenizer, rows, tmp_path)
    means = {k: [float(np.mean(v)) for v in ds[k]] for k in ds.column_names if "_ids" not in k}
    reward_wins = [
        c > r for c, r in zip(means["chosen_token_rewards"], means["rejected_token_rewards"])
    ]
    assert sum(reward_wins) >= 2 and reward_wins[1]
    ref_means = zip(means["chosen_ref_token_logps"], means["rejected_ref_token_logps"])
    assert all(c > r + 1.0 for c, r in ref_means)
    assert all(-0.5 < v < 0.5 for r in ds["rejected_token_rewards"] for v in r)
    assert max(abs(v) for r in ds["chosen_token_rewards"] for v in r) > 0.01  # the contexts matter


def test_eval_mode_during_annotation_and_scaled_logits_refused(rw_tokenizer, rw_helpers, tmp_path):
    model = rw_helpers.build_model(len(rw_tokenizer)).train()
    rows = rw_helpers.make_rows(rw_tokenizer, 1)
    modes = []
    model.model.register_forward_pre_hook(lambda module, args: modes.append(module.training))
    Annotator()(model, rw_tokenizer, rows, tmp_path / "a")
    assert modes and not any(modes) and model.training  # eval inside, restored after
    model.config.logit_scale = 0.5
    with pytest.raises(NotImplementedError, match=r"scales its logits \(logit_scale=0.5\)"):
        Annotator()(model, rw_tokenizer, rows, tmp_path / "b")
