"""Tokenize normalized pairs: prompt and responses separately, ids concatenated later.

The response token ids must be the very same ids wherever the response is scored (plain prompt,
contrastive prompts, training), so a response is tokenized once, on its own, and never
re-tokenized as part of a joined string (docs/method.md section 1).

* prompt ids = the chat template of the prompt messages with ``add_generation_prompt=True``,
  rendered to text and tokenized without special tokens; a BOS is prepended only when the
  tokenizer would add one by itself and the template did not (so BOS appears exactly once,
  never twice as with Gemma or Llama templates that already write ``{{ bos_token }}``);
* response ids = ``tokenizer(text, add_special_tokens=False)`` + the end-of-turn token
  (``tokenizer.eos_token_id``), unless the text already ends with it;
* the prompt is cut FROM THE LEFT to ``max_prompt_length`` (the most recent turns matter most;
  a leading BOS that occurs nowhere else in the prompt is kept, as the model always saw one
  first), then each response is
  cut from the right so that ``len(prompt) + len(response) <= max_length``.

A pair that cannot be used after truncation raises `InvalidRowError` (counted when skipping).
"""

from __future__ import annotations

from treg_lightning.data.errors import DataFormatError, InvalidRowError, SkipReport
from treg_lightning.errors import ConfigError
from treg_lightning.pairs import SIDES


class PairTokenizer:
    """Turns a normalized pair into ``prompt_ids`` / ``chosen_ids`` / ``rejected_ids``.

    Args:
        tokenizer: A Hugging Face tokenizer with a chat template and an EOS token.
        max_length: Maximum tokens of prompt + one response.
        max_prompt_length: Maximum prompt tokens; longer prompts lose their oldest tokens.
            Must be smaller than `max_length`, so that every response keeps at least one token.
        chat_template: A Jinja chat template to use instead of the tokenizer's own (required
            when the tokenizer has none, e.g. a base model).

    Raises:
        ValueError: Lengths inconsistent, or the tokenizer has no chat template or no EOS.
    """

    def __init__(
        self,
        tokenizer,
        max_length: int = 2048,
        max_prompt_length: int = 1800,
        chat_template: str | None = None,
    ) -> None:
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        if not 0 < max_prompt_length < max_length:
            raise ConfigError(
                f"max_prompt_length ({max_prompt_length}) must be positive and smaller than "
                f"max_length ({max_length}), so that every response keeps at least one token."
            )
        if chat_template is None and not getattr(tokenizer, "chat_template", None):
            raise ConfigError(
                f"the tokenizer '{name}' has no chat template. Pass the tokenizer of a chat / "
                "instruct model, or set `chat_template` to a Jinja template string."
            )
        if tokenizer.eos_token_id is None:
            raise ConfigError(
                f"the tokenizer '{name}' has no eos_token, needed to end each response; "
                "use a tokenizer that defines one."
            )
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.max_prompt_length = max_prompt_length
        self.chat_template = chat_template
        self.bos_token_id = tokenizer.bos_token_id
        self.eos_token_id = tokenizer.eos_token_id
        self._tokenizer_adds_bos = self._adds_bos()

    def _adds_bos(self) -> bool:
        if self.bos_token_id is None:
            return False
        ids = self.tokenizer("a", add_special_tokens=True)["input_ids"]
        return bool(ids) and ids[0] == self.bos_token_id

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        """Chat-template ids of `messages` with the assistant generation prompt, one BOS."""
        text = self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True, chat_template=self.chat_template
        )
        ids = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        if self._tokenizer_adds_bos and (not ids or ids[0] != self.bos_token_id):
            ids.insert(0, self.bos_token_id)
        return ids

    def truncated_prompt_ids(
        self, messages: list[dict], report: SkipReport | None = None
    ) -> list[int]:
        """The prompt ids training uses: :meth:`prompt_ids` cut from the left to
        ``max_prompt_length`` (a cut is counted in ``report.truncated["prompt"]``)."""
        return self._truncate_prompt(self.prompt_ids(messages), report)

    def response_ids(self, text: str) -> list[int]:
        """Ids of a response text followed by exactly one end-of-turn (EOS) token."""
        ids = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        if not ids or ids[-1] != self.eos_token_id:
            ids.append(self.eos_token_id)
        return ids

    def __call__(self, example: dict, report: SkipReport | None = None) -> dict:
        """Returns `example` plus ``prompt_ids``, ``chosen_ids``, ``rejected_ids``.

        Raises:
            InvalidRowError: The truncated chosen and rejected ids are identical.
        """
        prompt_ids = self.truncated_prompt_ids(example["prompt"], report)
        room = self.max_length - len(prompt_ids)  # >= 1 since max_prompt_length < max_length
        tokenized = {**example, "prompt_ids": prompt_ids}
        for side in SIDES:
            ids = self.response_ids(example[side])
            if len(ids) > room and report is not None:
                report.truncated[side] += 1
            tokenized[f"{side}_ids"] = ids[:room]
        if tokenized["chosen_ids"] == tokenized["rejected_ids"]:
            raise InvalidRowError(
                f"chosen and rejected are identical once truncated to max_length "
                f"({self.max_length}) with a {len(prompt_ids)}-token prompt",
                field="rejected",
                reason="chosen identical to rejected after truncation",
                hint="Raise max_length or lower max_prompt_length; or set skip_invalid_rows=true "
                "to count and skip it.",
            )
        return tokenized

    def _truncate_prompt(self, ids: list[int], report: SkipReport | None) -> list[int]:
        if len(ids) <= self.max_prompt_length:
            return ids
        if report is not None:
            report.truncated["prompt"] += 1
        # Keep a leading BOS only when it is a true start-of-text token; some tokenizers
        # (SmolLM2) name <|im_start|> as BOS, which opens every turn and is not special here.
        bos = self.bos_token_id
        if bos is not None and ids[0] == bos and bos not in ids[1:]:
            return [ids[0]] + ids[len(ids) - self.max_prompt_length + 1 :]
        return ids[len(ids) - self.max_prompt_length :]


def tokenize_pairs(
    examples: list[dict],
    pair_tokenizer: PairTokenizer,
    skip_invalid_rows: bool,
    report: SkipReport,
    source_name: str | None = None,
) -> list[dict]:
    """Tokenizes normalized examples; pairs that cannot be used are skipped and counted.

    Args:
        examples: Output of `normalize_rows` (each with its source ``index``).
        pair_tokenizer: The configured `PairTokenizer`.
        skip_invalid_rows: Skip and count unusable pairs instead of raising.
        report: Receives skips and truncation counts.
        source_name: Source display name for error messages.
    """
    rows = []
    for example in examples:
        try:
            rows.append(pair_tokenizer(example, report))
        except DataFormatError as error:
            error = error.located(file=source_name, row=example.get("index"))
            if not (skip_invalid_rows and isinstance(error, InvalidRowError)):
                raise error from None
            report.skip(error)
    return rows
