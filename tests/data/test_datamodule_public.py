"""What other packages use of ``PreferenceDataModule``, as public methods: ``get_tokenizer``
(loaded once, shared) and ``serve`` (rows annotated by a reward source with the data's context);
and the prompts-file reader of ``data/`` with the prompt cut training applies."""

from __future__ import annotations

import json
from unittest import mock

from treg_lightning.data.datamodule import PreferenceDataModule
from treg_lightning.data.prompt_files import read_prompts_file
from treg_lightning.data.tokenize import PairTokenizer


def _data(tokenizer_dir, **kwargs) -> PreferenceDataModule:
    settings = dict(tokenizer=str(tokenizer_dir), max_length=64, max_prompt_length=12)
    return PreferenceDataModule(**{**settings, "rewards": None, **kwargs})


def test_get_tokenizer_loads_once(tokenizer_dir):
    data = _data(tokenizer_dir)
    with mock.patch("treg_lightning.data.datamodule.load_tokenizer", return_value=object()) as load:
        first, second = data.get_tokenizer(), data.get_tokenizer()
    assert first is second is data.tokenizer
    load.assert_called_once_with(str(tokenizer_dir), trust_remote_code=False)


class _Marking:
    """A token-reward source that records what it was given and marks each row."""

    def __init__(self) -> None:
        self.calls = []

    def annotate(self, rows, split, context):
        self.calls.append((split, context))
        return [{**row, "marked": split} for row in rows]


def test_serve_hands_rows_to_the_given_source_with_the_datas_context(tokenizer_dir):
    data = _data(tokenizer_dir)
    rows = [{"index": 0}, {"index": 1}]
    assert data.serve("val", rows) is rows  # rewards=None: served as they are
    source = _Marking()
    assert data.serve("val", rows, source) == [
        {"index": 0, "marked": "val"},
        {"index": 1, "marked": "val"},
    ]
    ((split, context),) = source.calls
    assert split == "val" and context.tokenizer is data.get_tokenizer()
    assert context.model_name == str(tokenizer_dir)
    assert context.settings == {"max_length": 64, "max_prompt_length": 12}


def test_prompts_file_rows_and_the_training_cut(tmp_path, tokenizer):
    path = tmp_path / "prompts.jsonl"
    rows = ["Hi", {"instruction": "Sum", "input": "1 2", "dataset": "x"}]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    prompts = read_prompts_file(path)
    assert prompts == [
        {"messages": [{"role": "user", "content": "Hi"}], "extra": {}},
        {"messages": [{"role": "user", "content": "Sum\n\n1 2"}], "extra": {"dataset": "x"}},
    ]
    pair_tokenizer = PairTokenizer(tokenizer, max_length=64, max_prompt_length=12)
    full = pair_tokenizer.prompt_ids(prompts[1]["messages"])
    assert len(full) > 12
    cut = pair_tokenizer.truncated_prompt_ids(prompts[1]["messages"])
    assert cut == [full[0], *full[len(full) - 11 :]]  # BOS kept, the rest from the left
