"""The fingerprinted cache: fingerprint sensitivity, reuse, and every refusal with its message."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from treg_lightning.rewards.annotate import ContrastiveScorer
from treg_lightning.rewards.cache import (
    CacheError,
    compute_fingerprint,
    load_or_build,
    read_meta,
)
from treg_lightning.rewards.prompts import get_template

SETTINGS = {"max_length": 512, "max_prompt_length": 384}


def _fp(model, tokenizer, rows, template="instruct", settings=SETTINGS, name="tiny"):
    return compute_fingerprint(
        model=model,
        tokenizer=tokenizer,
        template=get_template(template),
        rows=rows,
        settings=settings,
        model_name=name,
    )


class CountingScore:
    """``score_chunk`` running the real scorer on chunks of one pair (``build(...,
    chunk_pairs=1)``), counting the chunks it scores; ``fail_at=k`` raises KeyboardInterrupt
    when asked for the (k+1)-th chunk, after the first k were written."""

    def __init__(self, model, tokenizer, fail_at: int | None = None):
        self.model, self.tokenizer, self.calls = model, tokenizer, 0
        self.fail_at = fail_at
        self.scorer = ContrastiveScorer()

    def __call__(self, rows):
        if self.calls == self.fail_at:
            raise KeyboardInterrupt
        self.calls += 1
        return self.scorer.score(self.model, self.tokenizer, rows)


def build(rows, cache_dir, fingerprint, score):
    return load_or_build(rows, cache_dir, fingerprint, score, chunk_pairs=1)


def test_fingerprint_changes_with_every_input(rw_model, rw_tokenizer, rw_rows, rw_helpers):
    base = _fp(rw_model, rw_tokenizer, rw_rows)
    same_copy = rw_helpers.build_model(len(rw_tokenizer))  # same seed: same weights
    assert _fp(same_copy, rw_helpers.build_tokenizer(), [dict(r) for r in rw_rows]) == base

    changed = {}
    with torch.no_grad():
        same_copy.model.layers[1].mlp.down_proj.weight[3, 5] += (
            1e-3  # not a sampled element: the sum sees it
        )
    changed["model"] = _fp(same_copy, rw_tokenizer, rw_rows)
    other_config = rw_helpers.build_model(len(rw_tokenizer))
    other_config.config.rms_norm_eps = 1e-5
    changed["model"] = changed["model"], _fp(other_config, rw_tokenizer, rw_rows)
    tok = rw_helpers.build_tokenizer()
    tok.chat_template = tok.chat_template.replace("\n", " ")
    changed["tokenizer"] = _fp(rw_model, tok, rw_rows)
    changed["template"] = _fp(rw_model, rw_tokenizer, rw_rows, template="revise")
    changed["settings"] = _fp(rw_model, rw_tokenizer, rw_rows, settings={"max_length": 256})
    rows = [dict(r) for r in rw_rows]
    rows[2]["rejected_ids"] = rows[2]["rejected_ids"][:-2] + rows[2]["rejected_ids"][-1:]
    changed["data"] = _fp(rw_model, rw_tokenizer, rows)
    rows = [dict(r) for r in rw_rows]
    rows[0]["prompt"] = [{"role": "user", "content": "changed text, same ids"}]
    changed["data"] = changed["data"], _fp(rw_model, rw_tokenizer, rows)

    for part, fps in changed.items():
        for fp in fps if isinstance(fps, tuple) else (fps,):
            assert fp.digest != base.digest, part
            assert [k for k in base.parts if base.parts[k] != fp.parts[k]] == [part]


def test_fingerprint_of_weights_sample_detects_a_sampled_element(rw_model):
    """The first sampled element of every tensor is element 0: changing it changes the model
    part (a guard that the sampling reads values, not just shapes)."""
    from treg_lightning.rewards.cache import model_identity

    before = model_identity(rw_model)
    with torch.no_grad():
        original = rw_model.lm_head.weight[0, 0].item()
        rw_model.lm_head.weight[0, 0] = original + 0.5
        after = model_identity(rw_model)
        rw_model.lm_head.weight[0, 0] = original
    assert before != after and model_identity(rw_model) == before


def test_builds_once_then_reuses(rw_model, rw_tokenizer, rw_rows, tmp_path):
    fp = _fp(rw_model, rw_tokenizer, rw_rows)
    annotate = CountingScore(rw_model, rw_tokenizer)
    ds = build(rw_rows, tmp_path / "cache", fp, annotate)
    again = build(rw_rows, tmp_path / "cache", fp, annotate)
    assert annotate.calls == 3  # one chunk per pair, scored once
    assert again.data.table.equals(ds.data.table)
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["data", "meta.json"]
    meta = read_meta(tmp_path / "cache")
    assert meta["fingerprint"] == fp.digest and meta["num_rows"] == 3
    assert meta["description"]["template"] == "instruct"
    assert set(ds.column_names) == {
        "index",
        "prompt_ids",
        "chosen_ids",
        "rejected_ids",
        "chosen_token_rewards",
        "rejected_token_rewards",
        "chosen_ref_token_logps",
        "rejected_ref_token_logps",
    }


def test_interrupted_build_resumes(rw_model, rw_tokenizer, rw_rows, tmp_path):
    fp = _fp(rw_model, rw_tokenizer, rw_rows)
    with pytest.raises(KeyboardInterrupt):
        build(rw_rows, tmp_path, fp, CountingScore(rw_model, rw_tokenizer, fail_at=1))
    assert not (tmp_path / "meta.json").exists()
    assert (tmp_path / "work" / "chunk-000000.safetensors").is_file()
    ds = build(rw_rows, tmp_path, fp, CountingScore(rw_model, rw_tokenizer))
    uninterrupted = build(rw_rows, tmp_path / "fresh", fp, CountingScore(rw_model, rw_tokenizer))
    assert ds.data.table.equals(uninterrupted.data.table)
    assert not (tmp_path / "work").exists()


def test_other_fingerprint_is_refused_with_names(rw_model, rw_tokenizer, rw_rows, tmp_path):
    build(
        rw_rows,
        tmp_path,
        _fp(rw_model, rw_tokenizer, rw_rows),
        CountingScore(rw_model, rw_tokenizer),
    )
    other = _fp(rw_model, rw_tokenizer, rw_rows, template="revise", name="other-model")
    with pytest.raises(CacheError) as info:
        build(rw_rows, tmp_path, other, CountingScore(rw_model, rw_tokenizer))
    message = str(info.value)
    assert f"at {tmp_path} was built for model 'tiny' / template 'instruct'" in message
    assert "uses model 'other-model' / template 'revise'" in message
    assert "differing inputs: template" in message
    assert "Delete it or point cache_dir elsewhere" in message


def test_unfinished_work_for_other_inputs_is_refused(rw_model, rw_tokenizer, rw_rows, tmp_path):
    fp = _fp(rw_model, rw_tokenizer, rw_rows)
    with pytest.raises(KeyboardInterrupt):
        build(rw_rows, tmp_path, fp, CountingScore(rw_model, rw_tokenizer, fail_at=1))
    other = _fp(rw_model, rw_tokenizer, rw_rows, settings={"max_length": 64})
    with pytest.raises(
        CacheError, match="unfinished token-reward cache at .* differing inputs: settings"
    ):
        build(rw_rows, tmp_path, other, CountingScore(rw_model, rw_tokenizer))


def test_stale_ids_name_the_row(rw_model, rw_tokenizer, rw_rows, tmp_path):
    build(rw_rows, tmp_path, "digest-1", CountingScore(rw_model, rw_tokenizer))
    rows = [dict(r) for r in rw_rows]
    rows[1]["chosen_ids"] = rows[1]["chosen_ids"][1:]
    with pytest.raises(
        CacheError, match=r"stale: row 1 \(source index 11\) has different chosen_ids"
    ):
        build(rows, tmp_path, "digest-1", CountingScore(rw_model, rw_tokenizer))


def test_damaged_caches_are_refused(rw_model, rw_tokenizer, rw_rows, tmp_path):
    annotate = CountingScore(rw_model, rw_tokenizer)
    build(rw_rows, tmp_path / "a", "d", annotate)
    for arrow in (tmp_path / "a" / "data").glob("*.arrow"):
        arrow.write_bytes(arrow.read_bytes()[:100])
    with pytest.raises(CacheError, match="is damaged: its Arrow data .* cannot be read"):
        build(rw_rows, tmp_path / "a", "d", annotate)

    build(rw_rows, tmp_path / "b", "d", annotate)
    (tmp_path / "b" / "meta.json").unlink()
    with pytest.raises(CacheError, match="is damaged: it has data/ but no meta.json"):
        build(rw_rows, tmp_path / "b", "d", annotate)

    build(rw_rows, tmp_path / "c", "d", annotate)
    (tmp_path / "c" / "meta.json").write_text("{not json")
    with pytest.raises(CacheError, match="meta.json is unreadable"):
        build(rw_rows, tmp_path / "c", "d", annotate)
    assert annotate.calls == 3 * 3  # three caches of three one-pair chunks, each built once


def test_foreign_folders_are_refused(rw_model, rw_tokenizer, rw_rows, tmp_path):
    annotate = CountingScore(rw_model, rw_tokenizer)
    (tmp_path / "f1").mkdir()
    (tmp_path / "f1" / "notes.txt").write_text("mine")
    with pytest.raises(CacheError, match="is not empty and holds no token-reward cache"):
        build(rw_rows, tmp_path / "f1", "d", annotate)
    (tmp_path / "f2").mkdir()
    (tmp_path / "f2" / "meta.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(CacheError, match="is not a treg-lightning token-reward cache"):
        build(rw_rows, tmp_path / "f2", "d", annotate)
    assert annotate.calls == 0
    assert (tmp_path / "f1" / "notes.txt").read_text() == "mine"  # nothing of theirs touched


def test_model_identity_handles_tensors_past_float32_counting():
    """An embedding of more than 2**24 entries (SmolLM2's has 28M) must not index past its end,
    and a change to its last entry changes the identity."""
    from treg_lightning.rewards.cache import model_identity

    module = torch.nn.Embedding(2**24 + 3, 1)
    torch.nn.init.zeros_(module.weight)
    before = model_identity(module)
    with torch.no_grad():
        module.weight[-1] = 1.0
    assert model_identity(module) != before


def test_values_changed_in_place_are_refused(rw_model, rw_tokenizer, rw_rows, tmp_path):
    """One stored reward overwritten in the Arrow file (same length, footer intact): the
    checksum in meta.json no longer matches and the load is refused, naming the folder."""
    ds = build(rw_rows, tmp_path, "d", CountingScore(rw_model, rw_tokenizer))
    assert len(read_meta(tmp_path)["data_sha256"]) == 64
    value = np.float32(ds["chosen_token_rewards"][1][2])
    (arrow,) = (tmp_path / "data").glob("*.arrow")
    data = arrow.read_bytes()
    assert data.count(value.tobytes()) >= 1
    arrow.write_bytes(data.replace(value.tobytes(), np.float32(value + 1).tobytes(), 1))
    assert len(arrow.read_bytes()) == len(data)
    with pytest.raises(CacheError) as info:
        build(rw_rows, tmp_path, "d", CountingScore(rw_model, rw_tokenizer))
    message = str(info.value)
    assert f"Token-reward cache at {tmp_path} is damaged" in message
    assert "do not match the checksum" in message and "Delete the folder" in message


CONCURRENT_BUILD = """
import json, os, sys, time
import numpy as np
from treg_lightning.rewards.cache import load_or_build
cache, log, go = sys.argv[1], sys.argv[2], sys.argv[3]
rows = [{"index": i, "prompt_ids": [1, i], "chosen_ids": [2, i, 3], "rejected_ids": [4] * (i + 1)}
        for i in range(4)]
def score(chunk):
    with open(log, "a") as f:
        f.write(f"{chunk[0]['index']}\\n")
    while not os.path.exists(go):  # the test says when to go on
        time.sleep(0.05)
    return {f"{side}_token_rewards": [np.asarray(r[f"{side}_ids"], np.float32) / 7 for r in chunk]
            for side in ("chosen", "rejected")}
ds = load_or_build(rows, cache, "digest", score, chunk_pairs=1)
print(json.dumps(ds.to_dict()))
"""


def test_two_processes_building_one_folder(tmp_path):
    """A second process started while the first builds the same folder waits for it (folder
    lock), scores nothing and loads the first's cache: it equals a single run's."""
    import contextlib
    import io
    import runpy
    import subprocess
    import sys
    import time
    from pathlib import Path
    from unittest import mock

    script = tmp_path / "build.py"
    script.write_text(CONCURRENT_BUILD)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "src")}

    def start(name, go):
        return subprocess.Popen(
            [sys.executable, str(script), str(tmp_path / "cache"), str(tmp_path / "scored"),
             str(go)],
            env=env, stdout=open(tmp_path / f"{name}.out", "w"),
            stderr=open(tmp_path / f"{name}.err", "w"),
        )  # fmt: skip

    def wait_for(condition, what):
        deadline = time.monotonic() + 60
        while not condition():
            assert time.monotonic() < deadline, what
            time.sleep(0.05)

    go = tmp_path / "go"
    first = start("first", go)
    second = None
    try:
        wait_for((tmp_path / "scored").exists, "the first never started scoring")
        second = start("second", go)
        waiting = "is being built or read by another process; waiting"
        wait_for(
            lambda: waiting in (tmp_path / "second.err").read_text(), "the second never waited"
        )
        go.touch()
        for process in (first, second):
            assert process.wait(timeout=120) == 0, (tmp_path / "second.err").read_text()
    finally:
        go.touch()  # a failed check leaves no process waiting
        for process in (first, second):
            if process is not None and process.poll() is None:
                process.kill()
                process.wait()
    assert sorted((tmp_path / "scored").read_text().split()) == ["0", "1", "2", "3"]  # once each
    (tmp_path / "scored").rename(tmp_path / "scored-before")
    argv = [str(script), str(tmp_path / "single"), str(tmp_path / "s"), str(go)]
    with mock.patch.object(sys, "argv", argv), contextlib.redirect_stdout(io.StringIO()) as out:
        runpy.run_path(str(script), run_name="__main__")  # a single run, in this process
    single = out.getvalue()
    first_out, second_out = ((tmp_path / f"{n}.out").read_text() for n in ("first", "second"))
    assert json.loads(first_out) == json.loads(second_out) == json.loads(single)
