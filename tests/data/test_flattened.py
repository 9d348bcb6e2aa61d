"""Data mistakes that used to train garbage with "skipped 0": message lists flattened to text by
another tool, empty prompts, and a prompt column under another name."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from treg_lightning.data.errors import DataFormatError, SkipReport
from treg_lightning.data.formats import normalize_rows
from treg_lightning.data.sources import RawSource, load_source
from treg_lightning.data.textlists import looks_like_messages, parse_messages


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def conversational(i: int) -> dict:
    return {
        "prompt": [user(f"What's {i} + {i}? Say \"it's {2 * i}\".")],
        "chosen": [assistant(f"It's {2 * i}.")],
        "rejected": [assistant("No idea, {really}.")],
    }


def normalize(source: RawSource, skip: bool = True) -> tuple[list[dict], SkipReport]:
    report = SkipReport()
    return normalize_rows(source, skip, report), report


def expected(i: int) -> dict:
    return {
        "index": i,
        "prompt": [user(f"What's {i} + {i}? Say \"it's {2 * i}\".")],
        "chosen": f"It's {2 * i}.",
        "rejected": "No idea, {really}.",
    }


# --- message lists flattened to text -----------------------------------------------------------


def test_pandas_csv_with_index_column_is_read_back(tmp_path):
    """DataFrame.to_csv writes each list as its Python repr, plus an unnamed index column."""
    pd = pytest.importorskip("pandas")
    path = tmp_path / "pairs.csv"
    pd.DataFrame([conversational(i) for i in range(3)]).to_csv(path)
    source = load_source(str(path))
    assert source.rows[0]["chosen"] == "[{'role': 'assistant', 'content': \"It's 0.\"}]"
    assert "" in source.rows[0]  # the index column
    examples, report = normalize(source)
    assert examples == [expected(i) for i in range(3)] and report.num_skipped == 0


def test_csv_of_a_parquet_read_by_pandas_numpy_repr(tmp_path):
    """Columns read from parquet are numpy arrays; their repr separates the dicts by spaces."""
    pd = pytest.importorskip("pandas")
    pytest.importorskip("pyarrow")
    rows = [conversational(i) for i in range(2)]
    rows[1]["prompt"] = [user("Hi } {"), assistant("Hello."), user("What's 1 + 1? Say \"it's 2\".")]
    pd.DataFrame(rows).to_parquet(tmp_path / "pairs.parquet")
    pd.read_parquet(tmp_path / "pairs.parquet").to_csv(tmp_path / "pairs.csv", index=False)
    cell = load_source(str(tmp_path / "pairs.csv")).rows[1]["prompt"]
    assert "} {" in cell and "}, {" not in cell  # numpy's repr: no commas between the dicts
    examples, report = normalize(load_source(str(tmp_path / "pairs.csv")))
    assert report.num_skipped == 0
    assert examples[1]["prompt"] == rows[1]["prompt"]  # "} {" inside a text is left alone


def test_jsonl_whose_chosen_is_json_text_of_a_message_list():
    row = conversational(1)
    row["chosen"] = json.dumps(row["chosen"])  # '[{"role": "assistant", ...}]'
    row["prompt"] = json.dumps(row["prompt"][0])  # a single message as a JSON object
    examples, report = normalize(RawSource("data.jsonl", [row], [1]))
    assert examples == [expected(1) | {"index": 0}] and report.num_skipped == 0


def test_mixed_rows_lists_and_text():
    rows = [conversational(0), conversational(1)]
    rows[1] = {key: repr(value) for key, value in rows[1].items()}
    examples, _ = normalize(RawSource("data.jsonl", rows, [1, 2]))
    assert examples == [expected(0), expected(1)]


@pytest.mark.parametrize(
    ("text", "why"),
    [
        pytest.param(
            "[{'role': 'user', 'content': 'Hi'}",
            "it is neither JSON nor a Python literal",
            id="cut",
        ),
        pytest.param(
            "[{'role': 'user', 'content': array(['Hi'], dtype=object)}]",
            "it is neither JSON nor a Python literal",
            id="call_inside",
        ),
        pytest.param(
            "[{'role': 'user', 'content': 'Hi'}, 3]",
            "not all of its items are {role, content} messages",
            id="not_messages",
        ),
    ],
)
def test_unreadable_flattened_list_is_counted_and_skipped_not_trained(text, why):
    row = {"prompt": text, "chosen": "Yes.", "rejected": "No."}
    examples, report = normalize(RawSource("data.csv", [row, dict(row, prompt="Fine?")]))
    assert [e["prompt"] for e in examples] == [[user("Fine?")]]  # the text was not trained
    assert report.summary() == (
        "skipped 1 of 2 rows: 1 message list stored as unreadable text (row 0)"
    )
    with pytest.raises(DataFormatError) as info:
        normalize(RawSource("data.csv", [row]), skip=False)
    assert str(info.value).startswith(
        "data.csv row 0, field 'prompt': looks like a message list stored as text, but cannot be "
        f"read back: {why}"
    )


def test_literal_eval_never_runs_code(tmp_path):
    marker = tmp_path / "ran"
    text = f"[{{'role': 'user', 'content': __import__('pathlib').Path('{marker}').touch()}}]"
    assert looks_like_messages(text)
    with pytest.raises(DataFormatError, match="cannot be read back"):
        parse_messages(text, "prompt")
    assert not marker.exists()


@pytest.mark.parametrize(
    "text",
    [
        "[1, 2, 3] are the first numbers.",
        "[citation needed] The role of the user is ...",
        "{'a': 1} is a dict literal.",
        "Use the role: field of each message.",
    ],
)
def test_prose_is_left_as_text(text):
    assert not looks_like_messages(text)


# --- empty prompts ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prompt", "chosen", "rejected", "field"),
    [
        pytest.param("", "Yes.", "No.", "prompt", id="empty_string"),
        pytest.param("  \n ", "Yes.", "No.", "prompt", id="whitespace"),
        pytest.param([], "Yes.", "No.", "prompt", id="empty_list_string_responses"),
        pytest.param([], [assistant("Yes.")], [assistant("No.")], "prompt", id="empty_list"),
        pytest.param([user("")], "Yes.", "No.", "prompt", id="empty_user_turn"),
        pytest.param("\n\nHuman:  \n\nAssistant:", "Yes.", "No.", "prompt", id="hh_empty_turn"),
        pytest.param(
            [user(" "), assistant("Hello."), user("And now?")],
            "Yes.",
            "No.",
            "prompt[0].content",
            id="earlier_user_turn_empty",
        ),
    ],
)
def test_empty_prompt_is_counted_not_trained(prompt, chosen, rejected, field):
    rows = [{"prompt": prompt, "chosen": chosen, "rejected": rejected}]
    rows.append({"prompt": "Ok?", "chosen": "Yes.", "rejected": "No."})
    examples, report = normalize(RawSource("data.jsonl", rows, [1, 2]))
    assert [e["index"] for e in examples] == [1]
    assert report.summary() == "skipped 1 of 2 rows: 1 empty prompt (row 0)"
    with pytest.raises(DataFormatError) as info:
        normalize(RawSource("data.jsonl", rows[:1], [1]), skip=False)
    assert str(info.value).startswith(f"data.jsonl row 0 (line 1), field '{field}': empty ")


@pytest.mark.parametrize(
    "text",
    [
        "[ {'role': 'user', 'content': 'Hi'} ]",
        '  {"content": "Hi", "role": "user"}',  # role after a long content is still found
        "[{'role': 'user', 'content': 'Hi'}",  # cut off: detected, then refused
    ],
)
def test_flattened_lists_are_detected(text):
    assert looks_like_messages(text)


def test_bare_brackets_stay_text():
    # "[]" names no role: it may be a real answer ("an empty Python list is []"), so it stays text.
    assert not looks_like_messages("[]")


# --- a prompt column under another name ---------------------------------------------------------


@pytest.mark.parametrize("alias", ["question", "instruction", "query", "input", "context"])
def test_prompt_under_another_name_is_named(alias):
    row = {"id": 7, alias: "What is 2+2?", "chosen": "4", "rejected": "5"}
    with pytest.raises(DataFormatError) as info:
        normalize(RawSource("qa.jsonl", [row], [3]))  # a schema error: raised even when skipping
    assert str(info.value) == (
        f"qa.jsonl row 0 (line 3), field 'prompt': no 'prompt' column; the file has columns "
        f"['id', '{alias}', 'chosen', 'rejected']. Rename '{alias}' to 'prompt' (e.g. "
        f"Dataset.rename_column('{alias}', 'prompt'), or edit the header), or give "
        "chosen/rejected as full conversations."
    )


def test_alias_beside_hh_transcripts_is_not_an_error():
    row = {
        "context": "unrelated",
        "chosen": "\n\nHuman: Hi\n\nAssistant: Hello.",
        "rejected": "\n\nHuman: Hi\n\nAssistant: Go away.",
    }
    examples, report = normalize(RawSource("hh.jsonl", [row], [1]))
    assert examples[0]["prompt"] == [user("Hi")] and report.num_skipped == 0


def test_no_prompt_and_no_alias_lists_the_columns():
    row = {"id": 1, "chosen": "4", "rejected": "5"}
    with pytest.raises(DataFormatError) as info:
        normalize(RawSource("x.jsonl", [row], [1]), skip=False)
    assert "(the row has columns ['id', 'chosen', 'rejected'])" in str(info.value)
    assert "rename the one that holds the prompt" in str(info.value)


def test_real_hh_rlhf_file_skips_no_more_rows(hh_file: Path):
    """The checks above add no skip on the real HH-RLHF test split (8 of 1500, as before)."""
    examples, report = normalize(load_source(str(hh_file)))
    assert (len(examples), report.num_skipped) == (1492, 8)
    assert "empty prompt" not in report.skipped
