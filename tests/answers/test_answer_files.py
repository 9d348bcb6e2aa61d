"""The files `treg predict` and `treg pairs` write are what their names say: `.jsonl` JSON lines,
`.json` one JSON list (AlpacaEval's model_outputs.json), any other name refused at start-up
with nothing loaded or written; `treg evaluate` and the data readers read both layouts back."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from unittest import mock

import pytest

from builders import answer_args, no_model_load, save_tiny_model, write_pairs
from treg_lightning.answers.evaluate_checks import check_answers_file
from treg_lightning.answers.record_files import read_records
from treg_lightning.cli.main import TRegCLI
from treg_lightning.cli.main import cli_main as treg_main
from treg_lightning.errors import ConfigError

UF_ROW = {
    "prompt": "Name a color.",
    "prompt_id": "p-1",
    "messages": [
        {"role": "user", "content": "Name a color."},
        {"role": "assistant", "content": "Red."},
    ],  # fmt: skip
    "chosen": [
        {"role": "user", "content": "Name a color."},
        {"role": "assistant", "content": "Red."},
    ],  # fmt: skip
    "rejected": [
        {"role": "user", "content": "Name a color."},
        {"role": "assistant", "content": "No."},
    ],  # fmt: skip
    "score_chosen": 9.0,
    "score_rejected": 2.0,
}


@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("answer-files")
    prompts = root / "prompts.jsonl"
    rows = ["Say hi.", UF_ROW, {"instruction": "Count to 3.", "dataset": "mine"}]
    prompts.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    return {"root": root, "prompts": prompts, "data": write_pairs(root / "data.jsonl", 6),
            "judge": save_tiny_model(root / "judge", seed=1)}  # fmt: skip


def run(args: list[str]) -> None:
    with mock.patch.object(sys, "argv", ["treg"]):
        TRegCLI(args=args)


def common(model, env, out: Path) -> list[str]:
    return [
        *answer_args(model, env["data"], env["prompts"], out),
        "--sampling.max_new_tokens=5",
        "--generation.batch_size=2",
        "--generation.shard_size=2",
        "--generation.progress=false",
    ]


def pairs_extra(env, model) -> list[str]:
    return ["--pairs.k=2", "--sampling.temperature=1.0", "--sampling.top_p=0.95",
            "--scorer=treg_lightning.answers.scorers.ImplicitRewardScorer",
            f"--scorer.policy={env['judge']}", f"--scorer.reference={model}"]  # fmt: skip


def test_predict_writes_a_json_list_for_json_and_json_lines_for_jsonl(env, tiny_model_dir):
    """`--output answers.json` used to hold JSON lines. The UltraFeedback row is answered as
    its prompt; its answers and scores are not carried into the answers."""
    lines, listed = env["root"] / "answers.jsonl", env["root"] / "answers.json"
    for out in (lines, listed):
        run(["predict", *common(tiny_model_dir, env, out)])
    rows = [json.loads(line) for line in lines.read_text(encoding="utf-8").splitlines()]
    assert json.loads(listed.read_text(encoding="utf-8")) == rows
    assert read_records(listed) == read_records(lines) == rows
    assert [r["instruction"] for r in rows] == ["Say hi.", "Name a color.", "Count to 3."]
    assert rows[1]["prompt_id"] == "p-1"
    assert not {"chosen", "rejected", "score_chosen", "score_rejected"} & set(rows[1])
    assert rows[1]["messages"][:-1] == [{"role": "user", "content": "Name a color."}]
    assert rows[2]["dataset"] == "mine"
    check_answers_file(listed, "run 'a': predictions")  # evaluate reads the list back


@pytest.mark.parametrize("name", ["answers.txt", "answers", "answers.jsonl.gz", "answers.csv"])
@pytest.mark.parametrize("verb", ["predict", "pairs"])
def test_other_output_names_are_refused_at_start_up(env, tiny_model_dir, tmp_path, capsys,
                                                    name, verb):  # fmt: skip
    out = tmp_path / name
    args = [verb, *common(tiny_model_dir, env, out)]
    if verb == "pairs":
        args += pairs_extra(env, tiny_model_dir)
    with (
        no_model_load("treg_lightning.answers.prompt_sets.load_prompt_set"),
        mock.patch.object(sys, "argv", ["treg"]),
        pytest.raises(SystemExit) as info,
    ):
        treg_main(args)
    err = capsys.readouterr().err
    assert info.value.code == 2 and "Traceback" not in err
    named = f"ends with {out.suffix}" if out.suffix else "has no suffix"
    assert err.strip().splitlines()[-1] == (
        f"error: --output.path {out}: the name {named}, which says neither of the two layouts "
        "written here. Name the file .jsonl (JSON lines, one object a line) or .json (one JSON "
        "list, as AlpacaEval's model_outputs.json)."
    )
    assert list(tmp_path.iterdir()) == []


def test_pairs_json_output_is_a_list_the_data_readers_read(env, tiny_model_dir):
    from treg_lightning.data.sources import load_source

    out = env["root"] / "pairs.json"
    run(["pairs", *common(tiny_model_dir, env, out), *pairs_extra(env, tiny_model_dir)])
    pairs = json.loads(out.read_text(encoding="utf-8"))
    summary = json.loads((env["root"] / "pairs.summary.json").read_text())
    assert isinstance(pairs, list) and len(pairs) == summary["kept"]
    samples = env["root"] / "pairs.samples.jsonl"  # the sidecar stays JSON lines
    assert len(samples.read_text().splitlines()) == 3 * 2
    assert load_source(str(out)).rows == pairs  # what treg fit --data.source reads


def test_evaluate_reads_json_lists_and_names_their_items(tmp_path):
    good = tmp_path / "a.json"
    good.write_text(json.dumps([{"instruction": "Hi", "output": "Hello"}]))
    check_answers_file(good, "run 'a': predictions")
    bad = tmp_path / "b.json"
    bad.write_text(json.dumps({"instruction": "Hi", "output": "Hello"}))
    with pytest.raises(ConfigError, match=r"holds a JSON dict, not a list: a \.json answers"):
        check_answers_file(bad, "run 'a': predictions")
    bad.write_text(json.dumps([{"output": "a"}, {"prompt": "p", "chosen": "c", "rejected": "r"}]))
    with pytest.raises(ConfigError, match=r"b\.json item 0 has keys \['output'\]"):
        check_answers_file(bad, "run 'a': predictions")
    bad.write_text(json.dumps([{"prompt": "p", "chosen": "c", "rejected": "r"}]))
    with pytest.raises(ConfigError, match=r"preference pairs \(item 0 has 'chosen'"):
        check_answers_file(bad, "run 'a': predictions")
    bad.write_text("[]")
    with pytest.raises(ConfigError, match="is empty: it holds no answers"):
        check_answers_file(bad, "run 'a': predictions")
