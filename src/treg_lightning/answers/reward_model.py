"""Score answers with a Hugging Face sequence-classification reward model.

Any ``AutoModelForSequenceClassification`` with one output (the reward models the SimPO sets
were labelled with, Skywork-Reward, ...) scores a conversation ``prompt + answer`` rendered with
the reward model's own chat template. Conversations are scored in left-padded batches with
position ids from the attention mask, and read at their last token, so a batched score equals
the score of the conversation alone up to float rounding. Identical conversations (the same
token ids) are scored once per scorer, in whichever call meets them first: the same answer
always gets the same reward, so it ties exactly with itself in a win rate whatever batches
its copies fall in.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from treg_lightning.errors import ConfigError, MissingFileError
from treg_lightning.models.kinds import UNKNOWN
from treg_lightning.models.preflight import SEQUENCE_CLASSIFIER, check_model


def check_reward_model(
    name_or_path: str,
    setting: str,
    output_field: str | None = None,
    trust_remote_code: bool = False,
):
    """The start-up check of a reward model, from its config alone: it exists, is a sequence
    classifier (a causal LM, a bare backbone or an adapter folder is named as what it is: loaded
    as a classifier it would get a random score head), and has one output unless
    ``output_field`` names the field holding the reward.

    Returns:
        What was read (:class:`~treg_lightning.models.preflight.ModelFacts`).

    Raises:
        MissingFileError: no such folder or hub model.
        ConfigError: another kind of model, or several outputs and no ``output_field``.
    """

    path = Path(str(name_or_path)).expanduser()
    local = str(name_or_path).startswith(("/", "./", "../", "~")) or path.exists()
    if local and not path.is_dir():  # said for a reward model (a .gguf or 'smollm2' is none)
        raise MissingFileError(
            f"{setting} {path} does not exist (or is not a folder): give the folder of a "
            "sequence-classification reward model written by save_pretrained, or a Hugging Face "
            "hub id."
        )
    # transformers loads .bin reward models with weights_only torch.load: not refused here.
    facts = check_model(name_or_path, setting, expected=SEQUENCE_CLASSIFIER,
                        trust_remote_code=trust_remote_code, safetensors_only=False)  # fmt: skip
    labels = facts.num_labels
    if labels is None and facts.kind == UNKNOWN:  # remote code: its config still counts them
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
        labels = getattr(config, "num_labels", None)
    if output_field is None and labels not in (None, 1):
        raise ConfigError(
            f"{setting} {str(name_or_path)!r} has {labels} outputs (num_labels in its "
            "config.json) and no output field is named: which one is the reward is unknown. "
            "Name the output field that holds the reward (output_field; ArmoRM: score), or use "
            "a reward model with one output."
        )
    return facts


class RewardModelScorer:
    """Rewards of conversations under a sequence-classification reward model.

    Args:
        name_or_path: hub id or local folder of the reward model (safetensors).
        torch_dtype: dtype the reward model runs in.
        batch_size: conversations per forward pass.
        max_length: longest conversation in tokens; longer ones lose their oldest tokens (the
            answer, at the end, is kept) and are counted in ``truncated``. None: the model's
            ``max_position_embeddings``.
        device: where the reward model runs; None: CUDA when available, else CPU.
        trust_remote_code: allow model code from the hub.
        output_field: the field of the model's output that holds the reward (ArmoRM: ``score``)
            for models whose reward is not ``logits[:, 0]``; None: ``logits``, one output.
        setting: the setting that names the model, in the start-up check's messages.
    """

    def __init__(
        self,
        name_or_path: str,
        torch_dtype: str = "float32",
        batch_size: int = 8,
        max_length: int | None = None,
        device: str | None = None,
        trust_remote_code: bool = False,
        output_field: str | None = None,
        setting: str = "the reward model",
    ) -> None:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from treg_lightning.models.loading import parse_dtype

        check_reward_model(name_or_path, setting, output_field, trust_remote_code)  # no weights
        self.name = str(name_or_path)
        self.output_field = output_field
        self.tokenizer = AutoTokenizer.from_pretrained(
            name_or_path, trust_remote_code=trust_remote_code
        )
        if not getattr(self.tokenizer, "chat_template", None):
            raise ConfigError(
                f"the reward model {self.name!r} has no chat template: its tokenizer cannot "
                "render (prompt, answer) as it was trained to read them. Use a chat reward model."
            )
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = AutoModelForSequenceClassification.from_pretrained(
            name_or_path, dtype=parse_dtype(torch_dtype), trust_remote_code=trust_remote_code
        )
        self.model.to(self.device).eval()
        # Scoring decodes nothing after its forward: no key/value cache (set on the config, which
        # every model's forward reads, remote code included).
        self.model.config.use_cache = False
        if output_field is None and self.model.config.num_labels != 1:
            raise ConfigError(
                f"the reward model {self.name!r} has {self.model.config.num_labels} outputs; a "
                "reward model has one (num_labels=1), or name the output field that holds the "
                "reward (output_field, e.g. score for ArmoRM)."
            )
        positions = getattr(self.model.config, "max_position_embeddings", None)
        self.max_length = max_length or positions
        self.batch_size = batch_size
        self.truncated = 0
        self._scores: dict[tuple[int, ...], float] = {}

    def conversation_ids(self, messages: Sequence[dict]) -> list[int]:
        """Token ids of a conversation in the reward model's chat template (one BOS)."""
        tokenizer = self.tokenizer
        text = tokenizer.apply_chat_template(list(messages), tokenize=False)
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        bos = tokenizer.bos_token_id
        adds_bos = bos is not None and tokenizer("a")["input_ids"][:1] == [bos]
        if adds_bos and ids[:1] != [bos]:
            ids.insert(0, bos)
        if self.max_length is not None and len(ids) > self.max_length:
            self.truncated += 1
            ids = ids[len(ids) - self.max_length :]
        return ids

    @torch.no_grad()
    def score(self, conversations: Sequence[Sequence[dict]]) -> list[float]:
        """One reward per conversation (prompt messages + the assistant's answer).

        Conversations already scored by this scorer (same token ids) reuse their reward.
        """
        all_ids = [tuple(self.conversation_ids(c)) for c in conversations]
        new = {ids for ids in all_ids if ids not in self._scores}
        new = sorted(new, key=lambda ids: (len(ids), ids))  # by length: less padding
        for start in range(0, len(new), self.batch_size):
            chosen = new[start : start + self.batch_size]
            values = self._score_batch([list(ids) for ids in chosen])
            self._scores.update(zip(chosen, values, strict=True))
        return [self._scores[ids] for ids in all_ids]

    def _score_batch(self, batch: list[list[int]]) -> list[float]:
        # The pad id must occur in no sequence: sequence-classification heads read the last
        # token that is not the pad id, which with left padding is then the true last token.
        present = {t for ids in batch for t in ids}
        pad = next(t for t in range(len(self.tokenizer)) if t not in present)
        longest = max(len(ids) for ids in batch)
        input_ids = torch.full((len(batch), longest), pad, dtype=torch.long)
        mask = torch.zeros_like(input_ids)
        for row, ids in enumerate(batch):
            input_ids[row, longest - len(ids) :] = torch.tensor(ids)
            mask[row, longest - len(ids) :] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        config = self.model.config
        saved, config.pad_token_id = config.pad_token_id, pad
        try:
            output = self.model(
                input_ids=input_ids.to(self.device),
                attention_mask=mask.to(self.device),
                position_ids=positions.to(self.device),
            )
        finally:
            config.pad_token_id = saved
        if self.output_field is None:
            return output.logits[:, 0].float().cpu().tolist()
        values = getattr(output, self.output_field, None)
        if values is None and isinstance(output, dict):
            values = output.get(self.output_field)
        if not isinstance(values, torch.Tensor) or values.numel() != len(batch):
            raise ConfigError(
                f"the reward model {self.name!r} output field {self.output_field!r} is not one "
                f"value per conversation (got {getattr(values, 'shape', type(values).__name__)}"
                "). Name the field that holds the reward (ArmoRM: score)."
            )
        return values.reshape(len(batch)).float().cpu().tolist()
