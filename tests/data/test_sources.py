"""Loading raw rows: every supported kind of source, and readable errors for broken files."""

from __future__ import annotations

import gzip
import json

import datasets
import pytest

from treg_lightning.data.errors import DataFormatError
from treg_lightning.data.sources import load_source

ROWS = [
    {"prompt": "p0", "chosen": "c0", "rejected": "r0"},
    {"prompt": "p1", "chosen": "c1", "rejected": "r1"},
    {"prompt": "p2", "chosen": "c2", "rejected": "r2"},
]


def write_jsonl(path, rows, blank_after_first=False):
    lines = [json.dumps(row) for row in rows]
    if blank_after_first:
        lines.insert(1, "")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_demo_set_is_shipped_and_loads():
    source = load_source("demo")
    assert source.name == "demo"
    assert len(source.rows) == 120
    assert set(source.rows[0]) == {"prompt", "chosen", "rejected", "topic"}
    assert source.lines[:3] == [1, 2, 3]


def test_jsonl_rows_and_line_numbers_skip_blank_lines(tmp_path):
    source = load_source(str(write_jsonl(tmp_path / "data.jsonl", ROWS, blank_after_first=True)))
    assert source.name == "data.jsonl"
    assert source.rows == ROWS
    assert source.lines == [1, 3, 4]
    assert source.line_of(1) == 3


def test_limit_keeps_the_first_rows(tmp_path):
    source = load_source(str(write_jsonl(tmp_path / "data.jsonl", ROWS)), limit=2)
    assert source.rows == ROWS[:2]
    assert source.lines == [1, 2]


def test_gzipped_jsonl(tmp_path):
    path = tmp_path / "data.jsonl.gz"
    path.write_bytes(gzip.compress("\n".join(json.dumps(r) for r in ROWS).encode()))
    assert load_source(str(path)).rows == ROWS


def test_json_list_columns_and_jsonl_content(tmp_path):
    as_list = tmp_path / "list.json"
    as_list.write_text(json.dumps(ROWS))
    as_columns = tmp_path / "columns.json"
    as_columns.write_text(json.dumps({k: [row[k] for row in ROWS] for k in ROWS[0]}))
    lines_in_json = write_jsonl(tmp_path / "lines.json", ROWS)
    for path in (as_list, as_columns, lines_in_json):
        assert load_source(str(path)).rows == ROWS


def test_parquet_and_csv(tmp_path):
    dataset = datasets.Dataset.from_list(ROWS)
    dataset.to_parquet(str(tmp_path / "data.parquet"))
    dataset.to_csv(str(tmp_path / "data.csv"), index=False)
    assert load_source(str(tmp_path / "data.parquet")).rows == ROWS
    assert load_source(str(tmp_path / "data.csv")).rows == ROWS


def test_save_to_disk_dataset_and_dataset_dict(tmp_path):
    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "single"))
    splits = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_list(ROWS[:2]),
            "test": datasets.Dataset.from_list(ROWS[2:]),
        }
    )
    splits.save_to_disk(str(tmp_path / "splits"))
    assert load_source(str(tmp_path / "single")).rows == ROWS
    test = load_source(str(tmp_path / "splits"), split="test")
    assert test.rows == ROWS[2:]
    assert test.name == "splits (split 'test')"
    with pytest.raises(
        DataFormatError, match=r"splits: no split 'validation'.*\['test', 'train'\]"
    ):
        load_source(str(tmp_path / "splits"), split="validation")


def test_script_free_data_folder_goes_through_load_dataset(tmp_path):
    folder = tmp_path / "my_pairs"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", ROWS[:2])
    write_jsonl(folder / "test.jsonl", ROWS[2:])
    assert load_source(str(folder), split="test").rows == ROWS[2:]
    assert load_source(str(folder), split="train").rows == ROWS[:2]


def test_hub_id_calls_load_dataset_with_split(monkeypatch):
    calls = []

    def fake_load_dataset(path, split):
        calls.append((path, split))
        return datasets.Dataset.from_list(ROWS)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    source = load_source("princeton-nlp/llama3-ultrafeedback-armorm", split="test", limit=2)
    assert calls == [("princeton-nlp/llama3-ultrafeedback-armorm", "test")]
    assert source.rows == ROWS[:2]
    assert source.name == "princeton-nlp/llama3-ultrafeedback-armorm (split 'test')"


def test_hub_failure_names_id_and_split(monkeypatch):
    def offline(path, split):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataFormatError, match=r"'org/pairs' split 'train': ConnectionError"):
        load_source("org/pairs")


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.jsonl: no such file or folder\. Pass"):
        load_source(str(tmp_path / "nope.jsonl"))


def test_unsupported_file_type(tmp_path):
    path = tmp_path / "data.txt"
    path.write_text("hello")
    with pytest.raises(DataFormatError, match=r"data\.txt: unsupported file type '\.txt'"):
        load_source(str(path))


def test_non_utf8_jsonl_names_file_and_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    text = json.dumps(ROWS[0]) + "\n" + json.dumps(ROWS[1]) + "\n" + '{"prompt": "caf\xe9"}\n'
    path.write_bytes(text.encode("latin-1"))
    with pytest.raises(DataFormatError) as info:
        load_source(str(path))
    assert str(info.value).startswith("latin1.jsonl line 3: not valid UTF-8 (byte 0xe9")
    assert "iconv" in str(info.value)


def test_truncated_jsonl_names_file_and_line(tmp_path):
    path = tmp_path / "cut.jsonl"
    full = "\n".join(json.dumps(row) for row in ROWS)
    path.write_text(full[: len(full) - 10])
    with pytest.raises(DataFormatError, match=r"^cut\.jsonl line 3: invalid JSON .* truncated"):
        load_source(str(path))


def test_jsonl_line_that_is_not_an_object(tmp_path):
    path = tmp_path / "list.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n[1, 2]\n")
    with pytest.raises(DataFormatError, match=r"^list\.jsonl line 2: expected a JSON object"):
        load_source(str(path))


def test_truncated_parquet_is_not_a_pyarrow_trace(tmp_path):
    path = tmp_path / "cut.parquet"
    datasets.Dataset.from_list(ROWS * 50).to_parquet(str(path))
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(DataFormatError) as info:
        load_source(str(path))
    assert str(info.value).startswith("cut.parquet: cannot read the parquet file")
    assert info.value.__cause__ is None  # raised "from None": no pyarrow stack underneath


def test_truncated_gzip(tmp_path):
    path = tmp_path / "cut.jsonl.gz"
    data = gzip.compress("\n".join(json.dumps(r) for r in ROWS * 20).encode())
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataFormatError, match=r"^cut\.jsonl\.gz: the gzip file is truncated"):
        load_source(str(path))


def test_utf8_byte_order_mark_is_not_part_of_the_first_column(tmp_path):
    path = tmp_path / "excel.csv"
    path.write_bytes(b"\xef\xbb\xbfprompt,chosen,rejected\np0,c0,r0\n")
    assert load_source(str(path)).rows == ROWS[:1]
