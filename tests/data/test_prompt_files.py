"""Prompts files (treg_lightning.data.prompt_files): a prompt follows training's rules (an empty
user turn after a system message is refused, naming the row and field, where training skips the
pair), UltraFeedback-style rows are asked up to their last user turn (the layouts of
HuggingFaceH4/ultrafeedback_binarized and princeton-nlp/llama3-ultrafeedback-armorm, as JSON
lines and as the parquet files the hub serves), and the source's answers never travel along."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from treg_lightning.data.errors import DataFormatError, InvalidRowError, SkipReport
from treg_lightning.data.formats import normalize_rows
from treg_lightning.data.prompt_files import read_prompts_file
from treg_lightning.data.sources import RawSource

QUESTION = "how can i develop a habit of drawing daily"
ANSWER_A = "Developing a daily habit of drawing can be challenging but with consistent practice."
ANSWER_B = "As an AI language model, I cannot personally develop habits for you."
PROMPT_ID = "086b3e24f29b8956a01059f79c56db35d118a06fb6b844b095737d042795cd43"

# A row of HuggingFaceH4/ultrafeedback_binarized (train_prefs): messages is the chosen
# conversation, the answer last.
BINARIZED = {
    "prompt": QUESTION,
    "prompt_id": PROMPT_ID,
    "chosen": [{"content": QUESTION, "role": "user"}, {"content": ANSWER_A, "role": "assistant"}],
    "rejected": [{"content": QUESTION, "role": "user"}, {"content": ANSWER_B, "role": "assistant"}],
    "messages": [{"content": QUESTION, "role": "user"}, {"content": ANSWER_A, "role": "assistant"}],
    "score_chosen": 8.5,
    "score_rejected": 6.0,
}
# A row of princeton-nlp/llama3-ultrafeedback-armorm: the policy's samples and their scores.
ARMORM = {
    "prompt_id": PROMPT_ID,
    "prompt": QUESTION,
    "all_generated_responses": [ANSWER_A, ANSWER_B],
    "all_rm_scores": [0.171875, 0.125],
    "chosen": BINARIZED["chosen"],
    "rejected": BINARIZED["rejected"],
}


def write(path, rows):
    if path.suffix == ".parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
@pytest.mark.parametrize("row", [BINARIZED, ARMORM], ids=["binarized", "armorm"])
def test_ultrafeedback_rows_are_asked_their_prompt(tmp_path, suffix, row):
    """Refused before ("the prompt must end with a user message": the messages field, holding
    the answer, was read as the prompt); the answers and their scores were carried along."""
    (prompt,) = read_prompts_file(write(tmp_path / f"uf{suffix}", [row]))
    assert prompt == {"messages": [{"role": "user", "content": QUESTION}],
                      "extra": {"prompt_id": PROMPT_ID}}  # fmt: skip


def test_a_conversation_is_asked_up_to_its_last_user_turn(tmp_path):
    turns = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Name a color."},
        {"role": "assistant", "content": "Red."},
    ]
    rows = [{"messages": turns}, {"messages": turns[:4]}, {"messages": turns[:4], "source": "x"}]
    prompts = read_prompts_file(write(tmp_path / "chat.jsonl", rows))
    assert [p["messages"] for p in prompts] == [turns[:4]] * 3
    assert prompts[2]["extra"] == {"source": "x"}
    # Without a user turn to answer, nothing is left to ask.
    write(tmp_path / "answer-only.jsonl", [{"messages": [turns[4]]}])
    with pytest.raises(DataFormatError, match=r"row 0 \(line 1\), field 'messages': empty prompt"):
        read_prompts_file(tmp_path / "answer-only.jsonl")


EMPTY_TURN = [{"role": "system", "content": "You are helpful."}, {"role": "user", "content": " "}]


@pytest.mark.parametrize(
    ("row", "field"),
    [
        (EMPTY_TURN, "prompt[1].content"),
        ({"messages": EMPTY_TURN}, "messages[1].content"),
        ({"prompt": EMPTY_TURN}, "prompt[1].content"),
    ],  # fmt: skip
)
def test_an_empty_user_turn_after_a_system_message_is_refused_as_training_skips_it(
    tmp_path, row, field
):
    """Answered before (the system message held text), while training skips the pair: the
    same rule now, and the row named."""
    path = write(tmp_path / "prompts.jsonl", ["Say hi.", row])
    with pytest.raises(DataFormatError) as info:
        read_prompts_file(path)
    assert str(info.value) == (
        f"{path} row 1 (line 2), field '{field}': empty user message at prompt message 1. Fix "
        "or remove the row (training skips such a pair; a prompts file is answered row for "
        "row, so it is refused)."
    )
    # Training: the same prompt in a pair is skipped (or refused) by the same rule.
    pair = {"prompt": EMPTY_TURN, "chosen": "Hi.", "rejected": "No."}
    report = SkipReport()
    assert normalize_rows(RawSource("pairs.jsonl", [pair]), True, report) == []
    assert report.skipped == {"empty prompt": 1}
    with pytest.raises(InvalidRowError, match="empty user message at prompt message 1"):
        normalize_rows(RawSource("pairs.jsonl", [pair]), False, SkipReport())
