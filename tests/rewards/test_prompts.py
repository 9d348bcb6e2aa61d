"""Contrastive templates: exact contexts for each preset and chat-template kind."""

from __future__ import annotations

import pytest

from treg_lightning.rewards.prompts import (
    INSTRUCT_BETTER,
    INSTRUCT_WORSE,
    REVISE_BETTER,
    ContrastiveTemplate,
    get_template,
    supports_system_role,
)


def _render(tokenizer, messages) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def test_instruct_uses_system_message(rw_tokenizer, rw_rows):
    row = rw_rows[0]
    better, worse = get_template("instruct").build(rw_tokenizer, row["prompt"], row["chosen"])
    assert better == _render(
        rw_tokenizer, [{"role": "system", "content": INSTRUCT_BETTER}, *row["prompt"]]
    )
    assert worse == _render(
        rw_tokenizer, [{"role": "system", "content": INSTRUCT_WORSE}, *row["prompt"]]
    )
    # Both contexts end with the same generation prompt as the plain prompt.
    tail = _render(rw_tokenizer, [{"role": "user", "content": ""}])[-3:]
    assert better[-3:] == worse[-3:] == row["prompt_ids"][-3:] == tail


def test_instruct_merges_existing_system_message(rw_tokenizer, rw_rows):
    prompt = rw_rows[1]["prompt"]  # starts with {"role": "system", "content": "Be brief."}
    better, _ = get_template("instruct").build(rw_tokenizer, prompt, "x")
    expected = [{"role": "system", "content": f"{INSTRUCT_BETTER}\n\nBe brief."}, *prompt[1:]]
    assert better == _render(rw_tokenizer, expected)


def test_instruct_without_system_role_prepends_to_first_user_turn(rw_nosystem_tokenizer):
    assert not supports_system_role(rw_nosystem_tokenizer)
    prompt = [
        {"role": "user", "content": "Q1"},
        {"role": "assistant", "content": "A1"},
        {"role": "user", "content": "Q2"},
    ]
    _, worse = get_template("instruct").build(rw_nosystem_tokenizer, prompt, "x")
    text = rw_nosystem_tokenizer.decode(worse)
    assert text == (
        f"<bos><start_of_turn>user\n{INSTRUCT_WORSE}\n\nQ1<end_of_turn>\n"
        "<start_of_turn>model\nA1<end_of_turn>\n<start_of_turn>user\nQ2<end_of_turn>\n"
        "<start_of_turn>model\n"
    )


def test_revise_shows_conversation_and_response(rw_tokenizer):
    prompt = [{"role": "user", "content": "Q?"}]
    better, worse = get_template("revise").build(rw_tokenizer, prompt, "The answer.")
    user = REVISE_BETTER.replace("{query}", "User: Q?").replace("{response}", "The answer.")
    assert better == _render(rw_tokenizer, [{"role": "user", "content": user}])
    worse_text = rw_tokenizer.decode(worse)
    assert "unhelpful, incorrect, incoherent and verbose" in worse_text
    assert "### Response\nThe answer.\n" in worse_text and "User: Q?" in worse_text


def test_custom_template_from_config_keeps_literal_braces(rw_tokenizer):
    template = get_template(
        {
            "mode": "revise",
            "better": "Improve {response} for {query} {not_a_placeholder}",
            "worse": "Worsen {response} for {query}",
            "name": "mine",
        }
    )
    better, _ = template.build(rw_tokenizer, [{"role": "user", "content": "q"}], "r")
    content = "Improve r for User: q {not_a_placeholder}"
    assert better == _render(rw_tokenizer, [{"role": "user", "content": content}])
    assert template.to_dict() == {
        "name": "mine",
        "mode": "revise",
        "better": "Improve {response} for {query} {not_a_placeholder}",
        "worse": "Worsen {response} for {query}",
    }


def test_template_errors_say_what_to_fix():
    with pytest.raises(ValueError, match=r"lacks the placeholder\(s\) \{response\}"):
        ContrastiveTemplate("rewrite {query}", "worse {query} {response}", mode="revise")
    with pytest.raises(ValueError, match="must not show the scored response"):
        ContrastiveTemplate("be good {response}", "be bad", mode="instruct")
    with pytest.raises(ValueError, match=r"Unknown contrastive template preset 'nope'.*instruct"):
        get_template("nope")
    with pytest.raises(ValueError, match="mode must be"):
        ContrastiveTemplate("a", "b", mode="system")


def test_max_length_drops_old_turns_and_keeps_instruction(rw_tokenizer):
    prompt = [
        {"role": "user", "content": "old question " * 20},
        {"role": "assistant", "content": "old answer " * 20},
        {"role": "user", "content": "Newest question, quite long " * 10},
    ]
    full, _ = get_template("instruct").build(rw_tokenizer, prompt, "r")
    better, worse = get_template("instruct").build(rw_tokenizer, prompt, "r", max_length=300)
    assert len(full) > 300 and len(better) <= 300 and len(worse) <= 300
    text = rw_tokenizer.decode(better)
    assert INSTRUCT_BETTER in text and "old answer" not in text
    assert text.endswith("quite long <|im_end|>\n<|im_start|>assistant\n")


def test_revise_max_length_cuts_shown_response_end(rw_tokenizer):
    prompt = [{"role": "user", "content": "Q?"}]
    better, _ = get_template("revise").build(rw_tokenizer, prompt, "word " * 200, max_length=400)
    text = rw_tokenizer.decode(better)
    assert len(better) <= 400
    assert "Rewrite the response so that it is helpful" in text and "User: Q?" in text
