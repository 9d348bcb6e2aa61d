"""Normalization of every accepted layout, and one test per kind of bad input.

Every error must say where (file, row, line for jsonl, field) and what to do.
"""

from __future__ import annotations

import pytest

from treg_lightning.data.errors import DataFormatError, InvalidRowError, SkipReport
from treg_lightning.data.formats import normalize_row, normalize_rows
from treg_lightning.data.sources import RawSource, load_source


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def system(text):
    return {"role": "system", "content": text}


def normalize_one(row, skip=False):
    """Normalizes `row` as row 0 of a file 'data.jsonl' (line 1)."""
    report = SkipReport()
    examples = normalize_rows(RawSource("data.jsonl", [row], [1]), skip, report)
    return examples, report


def error_of(row) -> DataFormatError:
    with pytest.raises(DataFormatError) as info:
        normalize_one(row)
    return info.value


# --- accepted layouts --------------------------------------------------------------------------


def test_standard_format():
    row = {"prompt": "What is 2+2?", "chosen": " 4 ", "rejected": "5", "extra": 1}
    assert normalize_row(row) == {"prompt": [user("What is 2+2?")], "chosen": "4", "rejected": "5"}


def test_conversational_format_with_system_message():
    row = {
        "prompt": [system("Be brief."), user("Hi"), assistant("Hello!"), user("2+2?")],
        "chosen": [assistant("4")],
        "rejected": [assistant("5")],
    }
    expected_prompt = [system("Be brief."), user("Hi"), assistant("Hello!"), user("2+2?")]
    assert normalize_row(row) == {"prompt": expected_prompt, "chosen": "4", "rejected": "5"}


def test_implicit_prompt_full_conversations():
    row = {
        "chosen": [user("Hi"), assistant("Hello"), user("2+2?"), assistant("4")],
        "rejected": [user("Hi"), assistant("Hello"), user("2+2?"), assistant("5")],
    }
    assert normalize_row(row) == {
        "prompt": [user("Hi"), assistant("Hello"), user("2+2?")],
        "chosen": "4",
        "rejected": "5",
    }


def test_simpo_on_policy_layout_prompt_string_and_full_messages():
    # princeton-nlp/llama3-ultrafeedback-armorm: prompt str, chosen/rejected = [user, assistant]
    row = {
        "prompt_id": "abc",
        "prompt": "Name a color.",
        "chosen": [user("Name a color."), assistant("Blue.")],
        "rejected": [user("Name a color."), assistant("I cannot.")],
        "all_generated_responses": ["Blue.", "I cannot."],
    }
    assert normalize_row(row) == {
        "prompt": [user("Name a color.")],
        "chosen": "Blue.",
        "rejected": "I cannot.",
    }


def test_full_conversations_win_over_a_slightly_different_prompt_column():
    row = {
        "prompt": "Name a color. ",  # trailing space: not the conversation's first message
        "chosen": [user("Name a color."), assistant("Blue.")],
        "rejected": [user("Name a color."), assistant("Red.")],
    }
    assert normalize_row(row)["prompt"] == [user("Name a color.")]


def test_explicit_message_prompt_stripped_from_full_conversations():
    row = {
        "prompt": [user("Hi")],
        "chosen": [user("Hi"), assistant("Hello")],
        "rejected": [user("Hi"), assistant("Go away")],
    }
    assert normalize_row(row) == {"prompt": [user("Hi")], "chosen": "Hello", "rejected": "Go away"}


def test_text_parts_content_is_joined():
    parts = [{"type": "text", "text": "Hel"}, {"type": "text", "text": "lo"}]
    row = {"prompt": [{"role": "user", "content": parts}], "chosen": "a", "rejected": "b"}
    assert normalize_row(row)["prompt"] == [user("Hello")]


def test_hh_rlhf_transcripts():
    row = {
        "chosen": "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: Tell me a joke.\n\n"
        "Assistant: Why did the chicken cross the road?",
        "rejected": "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: Tell me a joke.\n\n"
        "Assistant: No.",
    }
    assert normalize_row(row) == {
        "prompt": [user("Hi there"), assistant("Hello!"), user("Tell me a joke.")],
        "chosen": "Why did the chicken cross the road?",
        "rejected": "No.",
    }


def test_hh_style_prompt_column_with_assistant_cue():
    row = {"prompt": "\n\nHuman: Hi\n\nAssistant:", "chosen": " Hello", "rejected": " Bye"}
    assert normalize_row(row) == {"prompt": [user("Hi")], "chosen": "Hello", "rejected": "Bye"}


def test_real_hh_rlhf_first_rows(hh_file):
    source = load_source(str(hh_file), limit=20)
    report = SkipReport()
    examples = normalize_rows(source, True, report)
    assert report.total == 20 and report.num_skipped == 0
    first = examples[0]
    assert [m["role"] for m in first["prompt"]] == [
        "user",
        "assistant",
        "user",
        "assistant",
        "user",
    ]
    assert first["prompt"][0]["content"] == "what are some pranks with a pen i can do?"
    assert (
        first["prompt"][-1]["content"] == "okay some of these do not have anything to do with pens"
    )
    assert first["chosen"].startswith("No, sorry!  All of these involve a pen")
    assert first["rejected"].startswith("There are lots of funny things you can do with pens")
    for example in examples:  # the transcript turns are gone from the texts
        assert "Human:" not in example["chosen"] and "Assistant:" not in example["rejected"]


def test_real_hh_rlhf_whole_file_skips_counted(hh_file):
    report = SkipReport()
    examples = normalize_rows(load_source(str(hh_file)), True, report)
    # Measured on this file: 4 responses are empty, 3 transcripts have two assistant turns in
    # a row, 1 pair differs before its last turn.
    assert len(examples) == 1492
    assert report.skipped == {
        "empty response": 4,
        "roles out of order": 3,
        "implicit prompt not shared": 1,
    }
    assert report.summary().startswith("skipped 8 of 1500 rows: 4 empty response (rows 86, 516, ")


# --- schema problems: always raise ---------------------------------------------------------


def test_missing_column_suggests_the_close_match_even_when_skipping():
    row = {"prompt": "p", "choosen": "a", "rejected": "b"}
    with pytest.raises(DataFormatError) as info:
        normalize_one(row, skip=True)
    assert not isinstance(info.value, InvalidRowError)
    assert str(info.value).startswith(
        "data.jsonl row 0 (line 1), field 'chosen': missing column 'chosen' "
        "(did you mean 'choosen'?)."
    )
    assert "Rename the column" in str(info.value)


def test_misspelled_prompt_column_is_not_taken_for_an_implicit_prompt():
    error = error_of({"promt": "p", "chosen": "a", "rejected": "b"})
    assert "field 'prompt': missing column 'prompt' (did you mean 'promt'?)" in str(error)


def test_prompt_id_column_is_not_a_misspelled_prompt():
    row = {
        "prompt_id": "x",
        "chosen": [user("q"), assistant("a")],
        "rejected": [user("q"), assistant("b")],
    }
    assert normalize_row(row)["prompt"] == [user("q")]


# --- row problems: raise with skip_invalid_rows=False, counted otherwise ------------------------


def test_empty_response():
    error = error_of({"prompt": "p", "chosen": "   \n", "rejected": "b"})
    assert isinstance(error, InvalidRowError)
    assert str(error) == (
        "data.jsonl row 0 (line 1), field 'chosen': empty response. Fix or remove the row, "
        "or set skip_invalid_rows=true to count and skip it."
    )


def test_null_response():
    error = error_of({"prompt": "p", "chosen": "a", "rejected": None})
    assert str(error).startswith("data.jsonl row 0 (line 1), field 'rejected': empty response")
    assert error.reason == "empty response"


def test_non_string_response():
    error = error_of({"prompt": "p", "chosen": 42, "rejected": "b"})
    assert (
        "field 'chosen': expected a string or a list of {role, content} messages, got int"
        in str(error)
    )
    assert error.reason == "non-string content"


def test_non_string_message_content():
    row = {"prompt": [user("q")], "chosen": [{"role": "assistant", "content": 3}], "rejected": "b"}
    error = error_of({**row, "rejected": [assistant("b")]})
    assert "field 'chosen[0].content': message content must be a string" in str(error)
    assert error.reason == "non-string content"


def test_unknown_role_suggests_close_match():
    row = {
        "chosen": [user("q"), {"role": "asistant", "content": "a"}],
        "rejected": [user("q"), assistant("b")],
    }
    error = error_of(row)
    assert "field 'chosen[1].role': unknown role 'asistant' (did you mean 'assistant'?)" in str(
        error
    )
    assert error.reason == "unknown role"


def test_message_without_role():
    row = {"prompt": [{"from": "human", "value": "q"}], "chosen": "a", "rejected": "b"}
    error = error_of(row)
    assert "field 'prompt[0]': expected a message {'role': ..., 'content': ...}" in str(error)


def test_roles_out_of_order_in_prompt():
    row = {"prompt": [user("a"), user("b")], "chosen": "x", "rejected": "y"}
    error = error_of(row)
    assert "field 'prompt': roles out of order: expected 'assistant' at prompt message 1" in str(
        error
    )
    assert error.reason == "roles out of order"


def test_prompt_must_end_with_user():
    row = {"prompt": [user("a"), assistant("b")], "chosen": "x", "rejected": "y"}
    assert "field 'prompt': the prompt must end with a user message" in str(error_of(row))


def test_response_must_be_an_assistant_message():
    row = {"prompt": [user("a")], "chosen": [user("x")], "rejected": [assistant("y")]}
    error = error_of(row)
    assert "field 'chosen[0].role': the response must be an assistant message, got 'user'" in str(
        error
    )


def test_chosen_identical_to_rejected():
    error = error_of({"prompt": "p", "chosen": "same ", "rejected": " same"})
    assert "field 'rejected': chosen identical to rejected" in str(error)
    assert error.reason == "chosen identical to rejected"


def test_implicit_conversations_that_do_not_share_a_prefix():
    row = {"chosen": [user("q1"), assistant("a")], "rejected": [user("q2"), assistant("b")]}
    error = error_of(row)
    assert "field 'chosen[0]': chosen and rejected do not share a prompt" in str(error)
    assert error.reason == "implicit prompt not shared"


def test_hh_transcripts_that_differ_before_the_last_turn():
    row = {
        "chosen": "\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: Bye\n\nAssistant: Bye!",
        "rejected": "\n\nHuman: Hi\n\nAssistant: Go away\n\nHuman: Bye\n\nAssistant: Bye!",
    }
    error = error_of(row)
    assert "do not share a prompt: they differ at message 1" in str(error)


def test_implicit_plain_strings_without_turn_markers():
    error = error_of({"chosen": "The answer is 4.", "rejected": "The answer is 5."})
    assert "field 'chosen': no 'prompt' column, and the text has no" in str(error)
    assert error.reason == "implicit prompt without turn markers"


def test_mixed_string_and_message_responses():
    error = error_of({"prompt": "p", "chosen": "a", "rejected": [assistant("b")]})
    assert "field 'rejected': chosen and rejected have different formats" in str(error)


def test_skip_report_counts_every_skipped_row_by_reason():
    rows = [
        {"prompt": "p", "chosen": "a", "rejected": "b"},
        {"prompt": "p", "chosen": "", "rejected": "b"},
        {"prompt": "p", "chosen": "a", "rejected": "c"},
        {"prompt": "p", "chosen": "a", "rejected": " "},
        {"prompt": "p", "chosen": "same", "rejected": "same"},
    ]
    report = SkipReport()
    examples = normalize_rows(RawSource("data.jsonl", rows), True, report)
    assert [e["index"] for e in examples] == [0, 2]
    assert report.summary() == (
        "skipped 3 of 5 rows: 2 empty response (rows 1, 3), 1 chosen identical to rejected (row 4)"
    )
