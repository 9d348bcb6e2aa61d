"""Contrastive prompt templates for self-generated token rewards (docs/method.md section 1).

The evaluator scores every response token under two opposite contexts built from the same
prompt: ``x_better`` asks for a helpful, correct, coherent, concise response, ``x_worse`` for an
unhelpful, incorrect, incoherent, verbose one. A template only builds those two contexts (token
ids ending with the assistant generation prompt); the response ids are appended by the caller,
never re-tokenized.

Two presets ship (the paper does not print its templates):

- ``instruct``: the instruction is a system message (prepended to the first user turn when the
  chat template has no system role, e.g. Gemma-2); the response is scored as the assistant turn.
- ``revise``: one user turn shows the conversation and the original response and asks for a
  rewrite that is better (or worse); the response tokens are scored as that rewrite.

Custom templates come from config, e.g.::

    template:
      class_path: treg_lightning.rewards.ContrastiveTemplate
      init_args: {mode: revise, better: "...{query}...{response}...", worse: "..."}
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

from treg_lightning.errors import ConfigError

_SYSTEM_PROBE = "treg-system-probe-7c1f"

INSTRUCT_BETTER = (
    "You are a helpful, honest and careful assistant. Give the best possible response to the "
    "user: helpful, correct, coherent and concise."
)
INSTRUCT_WORSE = (
    "You are an unhelpful and careless assistant. Give a bad response to the user: unhelpful, "
    "incorrect, incoherent and verbose."
)
_REVISE = (
    "Below is a conversation between a user and an AI assistant, followed by the assistant's "
    "response.\n\n### Conversation\n{query}\n\n### Response\n{response}\n\n### Task\nRewrite the "
    "response so that it is {quality}. Reply with the rewritten response only."
)
REVISE_BETTER = _REVISE.replace("{quality}", "helpful, correct, coherent and concise")
REVISE_WORSE = _REVISE.replace("{quality}", "unhelpful, incorrect, incoherent and verbose")

Messages = Sequence[Mapping[str, str]]


class ContrastiveTemplate:
    """Builds the ``x_better`` / ``x_worse`` contexts for one prompt and response.

    Args:
        better: for ``mode="instruct"``, the instruction asking for a good response (given as a
            system message); for ``mode="revise"``, the user message asking for a better
            rewrite, with the placeholders ``{query}`` (the conversation) and ``{response}``
            (the original response).
        worse: the same, asking for a bad response / a worse rewrite.
        mode: ``"instruct"`` (instruction as system message, response scored as the answer) or
            ``"revise"`` (response scored as the rewrite of itself).
        name: a label stored in cache metadata and shown in error messages.
    """

    def __init__(
        self,
        better: str = INSTRUCT_BETTER,
        worse: str = INSTRUCT_WORSE,
        mode: Literal["instruct", "revise"] = "instruct",
        name: str = "custom",
    ) -> None:
        if mode not in ("instruct", "revise"):
            raise ConfigError(
                f"ContrastiveTemplate mode must be 'instruct' or 'revise', got {mode!r}."
            )
        for field, text in (("better", better), ("worse", worse)):
            missing = [p for p in ("{query}", "{response}") if p not in text]
            if mode == "revise" and missing:
                raise ConfigError(
                    f"revise template '{name}': the {field} text lacks the placeholder(s) "
                    f"{', '.join(missing)}; it must show the conversation and the response."
                )
            if mode == "instruct" and "{response}" in text:
                raise ConfigError(
                    f"instruct template '{name}': the {field} text contains {{response}}; an "
                    "instruct template must not show the scored response (use mode='revise')."
                )
        self.better, self.worse, self.mode, self.name = better, worse, mode, name

    def to_dict(self) -> dict[str, str]:
        """The settings that define this template (stored in the cache fingerprint)."""
        return {"name": self.name, "mode": self.mode, "better": self.better, "worse": self.worse}

    def __repr__(self) -> str:
        return f"ContrastiveTemplate(name={self.name!r}, mode={self.mode!r})"

    def build(
        self,
        tokenizer,
        prompt_messages: Messages,
        response_text: str,
        max_length: int | None = None,
    ) -> tuple[list[int], list[int]]:
        """Token ids of the better and worse contexts, each ending with the generation prompt.

        Args:
            tokenizer (transformers.PreTrainedTokenizerBase): a tokenizer with a chat template.
            prompt_messages: the conversation, ``[{"role", "content"}, ...]`` ending with a
                user turn.
            response_text: the response being scored (shown in ``revise`` mode only).
            max_length: if set, older turns are dropped, then the oldest text of the first
                remaining turn (and, in ``revise`` mode, the end of the shown response) is cut
                until both contexts fit; the instruction itself is always kept.

        Returns:
            ``(better_prompt_ids, worse_prompt_ids)``.
        """
        messages = [dict(m) for m in prompt_messages]
        for _ in range(200):
            contexts = tuple(
                _render_ids(tokenizer, self._messages(tokenizer, messages, response_text, text))
                for text in (self.better, self.worse)
            )
            excess = max(map(len, contexts)) - (max_length or 10**12)
            if excess <= 0:
                return contexts
            messages, response_text = _shrink(messages, response_text, excess, self.mode)
        raise ConfigError(
            f"Template '{self.name}' cannot fit its contexts into max_length={max_length} tokens "
            "even with the conversation cut down; raise the context length limit."
        )

    def _messages(self, tokenizer, messages, response_text, instruction):
        if self.mode == "revise":
            user = instruction.replace("{query}", format_conversation(messages))
            return [{"role": "user", "content": user.replace("{response}", response_text)}]
        return with_instruction(tokenizer, messages, instruction)


def format_conversation(messages: Messages) -> str:
    """Plain-text view of a conversation: ``User: ...`` / ``Assistant: ...`` blocks."""
    return "\n\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in messages)


def supports_system_role(tokenizer) -> bool:
    """True when the chat template renders a system message (Gemma-2's raises or drops it)."""
    probe = [{"role": "system", "content": _SYSTEM_PROBE}, {"role": "user", "content": "hi"}]
    try:
        text = tokenizer.apply_chat_template(probe, tokenize=False, add_generation_prompt=True)
    except Exception:  # noqa: BLE001 -- templates signal "no system role" with any exception
        return False
    return _SYSTEM_PROBE in text


def with_instruction(tokenizer, messages: Messages, instruction: str) -> list[dict[str, str]]:
    """Messages with ``instruction`` as the system message (merged with an existing one), or
    prepended to the first user turn when the chat template has no system role."""
    messages = [dict(m) for m in messages]
    if messages and messages[0]["role"] == "system":
        system = messages.pop(0)["content"]
        instruction = f"{instruction}\n\n{system}"
    if supports_system_role(tokenizer):
        return [{"role": "system", "content": instruction}, *messages]
    first = messages[0]
    first["content"] = f"{instruction}\n\n{first['content']}"
    return messages


def _render_ids(tokenizer, messages) -> list[int]:
    # Render to text, then tokenize without special tokens, as the data pipeline does for the
    # plain prompt (treg_lightning.data.tokenize): a BOS is added only when the tokenizer adds one
    # by itself and the template did not write it, so BOS appears exactly once.
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    bos = tokenizer.bos_token_id
    if bos is not None and (not ids or ids[0] != bos):
        with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
        if with_special and with_special[0] == bos:
            ids.insert(0, bos)
    return ids


def _shrink(messages, response_text, excess_tokens, mode):
    """Cut the context a little: drop the oldest turn, else trim the oldest text."""
    if len(messages) > 1:
        messages = messages[1:]
        while len(messages) > 1 and messages[0]["role"] != "user":
            messages = messages[1:]
        return messages, response_text
    content = messages[0]["content"]
    cut = max(len(content) // 8, excess_tokens, 1)
    if mode == "revise" and len(response_text) > len(content):
        # The shown response is the long part: keep its beginning.
        cut = max(len(response_text) // 8, excess_tokens, 1)
        return messages, response_text[: max(len(response_text) - cut, 0)]
    if not content:
        raise ConfigError(
            "data.rewards.max_context_length is smaller than the contrastive instruction "
            "alone: the contexts do not fit even with the conversation cut to nothing. Raise "
            "it, or set it to null to keep contexts whole."
        )
    return [{**messages[0], "content": content[cut:]}], response_text


def instruct_template() -> ContrastiveTemplate:
    """The ``instruct`` preset: instruction as system message, response as the answer."""
    return ContrastiveTemplate(INSTRUCT_BETTER, INSTRUCT_WORSE, mode="instruct", name="instruct")


def revise_template() -> ContrastiveTemplate:
    """The ``revise`` preset: the response is scored as a better / worse rewrite of itself."""
    return ContrastiveTemplate(REVISE_BETTER, REVISE_WORSE, mode="revise", name="revise")


PRESETS = {"instruct": instruct_template, "revise": revise_template}


def get_template(
    template: str | ContrastiveTemplate | Mapping[str, str],
) -> ContrastiveTemplate:
    """A preset by name (``"instruct"``, ``"revise"``), a template as is, or one from a dict of
    :class:`ContrastiveTemplate` arguments (``{"mode": ..., "better": ..., "worse": ...}``)."""
    if isinstance(template, ContrastiveTemplate):
        return template
    if isinstance(template, Mapping):
        return ContrastiveTemplate(**template)
    if template not in PRESETS:
        raise ConfigError(
            f"Unknown contrastive template preset {template!r}; choose one of {sorted(PRESETS)} "
            "or pass a ContrastiveTemplate(better=..., worse=..., mode=...)."
        )
    return PRESETS[template]()
