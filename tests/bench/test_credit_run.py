"""bench/credit.py end to end on a tiny model: the per-token records equal an independent
recomputation from the saved policies (plain transformers forwards, labels from the tokenizer's
offsets), ``--report-from`` gives the same tables from the records alone, an external held-out
file in the span format is scored, and a bad one stops the run before anything trains."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from builders import BENCH, load_bench

VARIANTS = ("DPO", "DPO + T-REG (spans, alpha 1)", "DPO + T-REG (shuffled spans, alpha 1)")


def build_data(folder: Path) -> Path:
    credit_data = load_bench("credit_data")
    record = credit_data.build(folder, seed=0, hh_path=None, layout=credit_data.Layout("v2"))
    (folder / "fingerprint.json").write_text(json.dumps(record))
    return folder


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("credit")
    data = build_data(root / "data")  # the demo set only: no shared data needed
    credit = load_bench("credit")
    results = credit.main(["--size", "dry-run", "--seeds", "1", "--variants", *VARIANTS,
                           "--out", str(root / "out"), "--work-dir", str(root / "work"),
                           "--data", str(data)])  # fmt: skip
    return root, results


def read_records(path: Path) -> dict:
    with gzip.open(path, "rt") as f:
        return json.load(f)


@torch.no_grad()
def token_logps(model, prompt_ids: list[int], ids: list[int]) -> np.ndarray:
    logits = model(input_ids=torch.tensor([prompt_ids + ids])).logits[0].double()
    logps = torch.log_softmax(logits[len(prompt_ids) - 1 : -1], -1)
    return logps[torch.arange(len(ids)), torch.tensor(ids)].numpy()


@pytest.mark.parametrize("variant", VARIANTS)
def test_records_match_a_recomputation(tiny_run, variant):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    credit_metrics = load_bench("credit_metrics")
    root, results = tiny_run
    work = root / "work"
    slug = load_bench("credit").slug(variant)
    tokenizer = AutoTokenizer.from_pretrained(work / "tiny")
    base = AutoModelForCausalLM.from_pretrained(work / "tiny").eval()
    policy = AutoModelForCausalLM.from_pretrained(work / "policies" / f"{slug}-seed0").eval()
    pairs = [json.loads(line) for line in (work / "pairs" / "heldout.jsonl").read_text().split("\n")
             if line]  # fmt: skip
    saved = read_records(root / "out" / "tokens.json.gz")
    runs = saved["runs"][variant][0]
    shares = []
    for pair, fixed, run in zip(pairs, saved["pairs"], runs, strict=True):
        text = tokenizer.apply_chat_template(pair["prompt"], tokenize=False,
                                             add_generation_prompt=True)  # fmt: skip
        prompt_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        deltas = {}
        for side in ("chosen", "rejected"):
            encoded = tokenizer(pair[side][0]["content"], add_special_tokens=False,
                                return_offsets_mapping=True)  # fmt: skip
            ids = encoded["input_ids"] + [tokenizer.eos_token_id]
            delta = token_logps(policy, prompt_ids, ids) - token_logps(base, prompt_ids, ids)
            deltas[side] = delta[:-1]  # the end-of-turn token is left out
            if side == "rejected":
                (span,) = pair["rejected_spans"]
                labels = [int(s < span["end"] and e > span["start"])
                          for s, e in encoded["offset_mapping"]]  # fmt: skip
                assert fixed["labels"] == labels
                assert fixed["rejected_ids"] == encoded["input_ids"]
        # float32 forwards (LoRA vs merged weights, padded vs plain) and 6-digit rounding
        scale = max(1.0, float(np.abs(deltas["rejected"]).max()))
        tolerance = 1e-5 * scale + 256 * np.finfo(np.float32).eps * 10
        np.testing.assert_allclose(run["delta"], deltas["rejected"], atol=tolerance, rtol=1e-5)
        np.testing.assert_allclose(run["chosen_delta"], deltas["chosen"], atol=tolerance,
                                   rtol=1e-5)  # fmt: skip
        shares.append(credit_metrics.credit_share(deltas["rejected"], np.asarray(labels)))
    reported = results["levels"][variant]["all"]["credit_share"]["mean"]
    assert reported == pytest.approx(float(np.nanmean(shares)), abs=1e-3)


def test_report_from_the_records_alone(tiny_run, tmp_path):
    root, results = tiny_run
    again = load_bench("credit").main(["--report-from", str(root / "out"), "--out", str(tmp_path)])
    for key in ("levels", "paired", "contrasts", "chance", "decision"):
        assert again[key] == results[key], key
    for name in ("results.md", "credit_share.png", "collateral.png", "heatmaps.png"):
        assert (tmp_path / name).stat().st_size > 0
    assert results["decision"] is None  # the uniform control was not run: no verdict
    assert "shuffled spans" in results["audit"] and results["audit"]["spans"]["mean"] == 1.0


def test_an_existing_result_is_not_overwritten(tiny_run):
    from treg_lightning.errors import ConfigError

    root, _ = tiny_run
    before = (root / "out" / "results.json").read_bytes()
    with pytest.raises(ConfigError, match="--overwrite"):
        load_bench("credit").main(["--report-from", str(root / "out"), "--out", str(root / "out")])
    assert (root / "out" / "results.json").read_bytes() == before


def test_variant_names_give_source_and_strength():
    credit = load_bench("credit")
    assert credit.source_key("DPO") is None and credit.source_key("DPO (minimal pairs)") is None
    assert credit.source_key("DPO + T-REG (shuffled spans, alpha 1)") == "shuffled spans"
    assert credit.source_key("DPO + T-REG (two-model, alpha 1)") == "two-model"
    assert credit.variant_alpha("DPO + T-REG (spans, alpha 0.25)", 1.0) == 0.25
    assert credit.variant_alpha("DPO + T-REG (instruct)", 0.25) == 0.25
    _, regularizer = credit.loss_and_regularizer("DPO + T-REG (uniform, alpha 1)", 0.25)
    assert regularizer.alpha == 1.0
    assert credit.loss_and_regularizer("DPO (minimal pairs)", 0.25)[1] is None
    files = {"train": Path("t"), "train_minimal": Path("m")}
    assert credit.train_file("DPO (minimal pairs)", files) == Path("m")
    assert credit.train_file("DPO + T-REG (spans, alpha 1)", files) == Path("t")


def test_the_two_model_gate():
    """The two-model variant runs once the oracle's paired credit-share interval is above 0."""
    credit = load_bench("credit")
    report = load_bench("credit_report")

    def runs(oracle_gain: float) -> dict:
        def record(i, gain):  # DPO's share 0.5 + noise; the oracle's share moved by gain
            share = 0.5 + 0.1 * np.sin(i) + gain
            return {"id": f"p{i}", "labels": np.array([1, 0]),
                    "delta": np.array([-share, -(1 - share)])}  # fmt: skip

        return {
            report.BASE: [[record(i, 0.0) for i in range(20)] for _ in range(3)],
            report.ORACLE: [[record(i, oracle_gain) for i in range(20)] for _ in range(3)],
        }

    size = credit.SIZES["cpu"]
    shown, why = credit.two_model_gate(size, runs(0.1))
    assert shown and "+0.100" in why
    shown, why = credit.two_model_gate(size, runs(0.0))
    assert not shown and "no effect" in why

    assert not credit.two_model_gate(replace(size, two_model="never"), runs(0.1))[0]
    assert credit.two_model_gate(replace(size, two_model="always"), runs(0.0))[0]


# --- an external held-out file ---------------------------------------------------------------


@pytest.fixture(scope="module")
def heldout_file(tmp_path_factory):
    """Two built held-out pairs (with id and kind) and one pair of the user's own, in the
    standard layout with no id or kind."""
    root = tmp_path_factory.mktemp("external")
    data = build_data(root / "data")
    rows = [json.loads(line) for line in (data / "heldout.jsonl").read_text().splitlines()]
    built = [r for r in rows if r["condition"] == "non_minimal"][:2]
    text = "Sure. Add two cups of flour. Never mind, this is a stupid question."
    start = text.index("Never mind")
    own = {
        "prompt": "How do I make bread?",
        "chosen": "Mix flour, water and yeast.",
        "rejected": text,
        "rejected_spans": [{"start": start, "end": len(text), "reward": -1}],
    }
    path = root / "mine.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [*built, own]))
    return root, path, built, own


def test_an_external_heldout_file_is_scored(heldout_file):
    root, path, built, own = heldout_file
    results = load_bench("credit").main(["--size", "dry-run", "--seeds", "1", "--variants", "DPO",
                                   "--heldout", str(path), "--out", str(root / "out"),
                                   "--work-dir", str(root / "work"),
                                   "--data", str(root / "data")])  # fmt: skip
    saved = read_records(root / "out" / "tokens.json.gz")
    assert [p["id"] for p in saved["pairs"]] == [built[0]["id"], built[1]["id"], "row-2"]
    assert [p["kind"] for p in saved["pairs"]][2] == "unknown"
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(root / "work" / "tiny")
    mine = saved["pairs"][2]
    marked = [i for i, label in zip(mine["rejected_ids"], mine["labels"], strict=True) if label]
    assert tokenizer.decode(marked).strip() == "Never mind, this is a stupid question."
    assert results["settings"]["heldout_file"] == str(path)
    assert len(saved["runs"]["DPO"][0]) == 3


@pytest.fixture
def tiny_size(tiny_model_dir):

    return replace(load_bench("credit").SIZES["dry-run"], model=str(tiny_model_dir))


def write(path: Path, *rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


GOOD = {"prompt": "Hi?", "chosen": "Hello.", "rejected": "Go away, idiot.",
        "rejected_spans": [{"start": 9, "end": 15, "reward": -0.5}]}  # fmt: skip


@pytest.mark.parametrize(("bad", "field", "says"), [
    ({"rejected_spans": []}, "rejected_spans", "no defect span"),
    ({"rejected_spans": [{"start": 0, "end": 2, "reward": 0.5}]}, "rejected_spans",
     "no defect span"),
    ({"rejected_spans": [{"start": 9, "end": 99, "reward": -0.5}]}, "rejected_spans",
     "outside the response text"),
    ({"rejected": "Go away, idiot. " * 40}, "rejected", "--max-length"),
])  # fmt: skip
def test_a_bad_heldout_row_is_named(tiny_size, tokenizer_of, tmp_path, bad, field, says):
    from treg_lightning.data.errors import DataFormatError

    pairs = load_bench("credit_pairs")
    path = write(tmp_path / "mine.jsonl", GOOD, {**GOOD, **bad})
    with pytest.raises(DataFormatError) as caught:
        pairs.external_heldout(path, tiny_size, tokenizer_of(tiny_size), tmp_path / "work")
    message = str(caught.value)
    assert "mine.jsonl" in message and "row 1" in message and field in message, message
    assert says in message, message
    assert not (tmp_path / "work" / "pairs" / "heldout-external.jsonl").exists()


@pytest.fixture
def tokenizer_of():
    def load_it(size):
        from treg_lightning.models.loading import load_tokenizer

        return load_tokenizer(size.model)

    return load_it


def test_a_good_heldout_file_is_copied_with_ids(tiny_size, tokenizer_of, tmp_path):
    pairs = load_bench("credit_pairs")
    path = write(tmp_path / "mine.jsonl", GOOD, {**GOOD, "id": "x7", "kind": "insult"})
    out = pairs.external_heldout(path, tiny_size, tokenizer_of(tiny_size), tmp_path / "work")
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["id"], r["kind"]) for r in rows] == [("row-0", "unknown"), ("x7", "insult")]
    assert path.read_text().count("\n") == 2  # the user's file is left as it was


def test_the_script_exits_2_before_training(tmp_path):
    """A missing held-out file: one paragraph, status 2, no traceback, nothing trained."""
    done = subprocess.run(
        [sys.executable, str(BENCH / "credit.py"), "--size", "dry-run", "--heldout",
         str(tmp_path / "nowhere.jsonl"), "--out", str(tmp_path / "out"), "--work-dir",
         str(tmp_path / "work"), "--data", str(tmp_path / "data")],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr[-2000:]
    assert "nowhere.jsonl" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "work" / "logs").exists() and not (tmp_path / "out").exists()


def test_a_rerun_resumes_from_the_kept_scores(tiny_run, tmp_path, monkeypatch):
    root, results = tiny_run
    credit = load_bench("credit")
    trained = []
    monkeypatch.setattr(credit, "train", lambda *a, **k: trained.append(a) or 1 / 0)
    again = credit.main(["--size", "dry-run", "--seeds", "1", "--variants", *VARIANTS,
                         "--out", str(tmp_path / "out"), "--work-dir", str(root / "work"),
                         "--data", str(root / "data")])  # fmt: skip
    assert trained == []  # every (variant, seed) was scored by the first run
    for key in ("levels", "paired", "contrasts", "decision"):
        assert again[key] == results[key], key


def test_a_changed_setting_does_not_reuse_scores(tmp_path):
    credit = load_bench("credit")
    files = {"train": tmp_path / "t.jsonl"}
    files["train"].write_text("{}\n")
    size = credit.SIZES["dry-run"]
    first = credit.scores_folder(tmp_path, size, files)
    assert credit.scores_folder(tmp_path, replace(size, lr=0.5), files) != first
    files["train"].write_text("{} \n")
    assert credit.scores_folder(tmp_path, size, files) != first


def test_reaudit_recomputes_the_audit_rows_and_keeps_the_rest(tiny_run, tmp_path):
    root, results = tiny_run
    saved = json.loads((root / "out" / "extras.json").read_text())
    broken = tmp_path / "saved"
    broken.mkdir()
    for name in ("settings.json", "timings.json", "tokens.json.gz"):
        (broken / name).write_bytes((root / "out" / name).read_bytes())
    stale = {key: {"mean": 0.123, "low": None, "high": None} for key in saved["audit"]}
    (broken / "extras.json").write_text(json.dumps({**saved, "audit": stale}))
    again = load_bench("credit").main(["--report-from", str(broken), "--out", str(tmp_path / "out"),
                                 "--work-dir", str(root / "work"), "--reaudit"])  # fmt: skip
    assert again["audit"] == results["audit"]  # recomputed, not the stale rows
    for key in ("levels", "paired", "contrasts", "decision"):
        assert again[key] == results[key], key
