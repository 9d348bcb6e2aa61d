"""Scorers of sampled answers for ``treg pairs``: one float per (prompt, answer), higher better.

- :class:`SequenceClassifierScorer`: a Hugging Face sequence-classification reward model
  (:class:`~treg_lightning.answers.reward_model.RewardModelScorer`), one output, or the output field
  named by ``output_field`` (ArmoRM: ``score``); model code from the hub only with
  ``trust_remote_code``.
- :class:`ImplicitRewardScorer`: the implicit reward of a trained policy against its reference,
  ``beta * (log pi(y|x) - log pi_ref(y|x))`` of the answer (divided by its length in tokens
  when ``length_normalized``), with the token log-probs of training
  (:func:`treg_lightning.forward.logprobs.causal_lm_token_logps`); no extra model, works offline.

Every scorer checks what it can before any weights load (:meth:`Scorer.check`: the number of
outputs from ``config.json``, that its tokenizer renders every prompt with an answer), then
loads in :meth:`Scorer.setup`. A scorer's score of a conversation does not depend on the other
conversations of its batch beyond float tolerance.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from treg_lightning.errors import ConfigError
from treg_lightning.pairs import sequence_logps

# (prompt messages, answer text)
Item = tuple[list[dict], str]
PLACEHOLDER_ANSWER = "An answer."


class Scorer:
    """Scores (prompt, answer) items (subclass it; chosen by ``class_path``)."""

    def check(self, prompts: Sequence[list[dict]]) -> None:
        """Refuse what can be refused before any weights load (``prompts``: message lists)."""

    def setup(self, device: torch.device) -> None:
        """Load the models; called once per process before :meth:`score`."""
        raise NotImplementedError

    def score(self, items: Sequence[Item]) -> list[float]:
        """One score per item, in order."""
        raise NotImplementedError

    def fingerprint(self) -> dict[str, Any]:
        """What about the scorer changes the scores (part of the run's fingerprint)."""
        raise NotImplementedError


def conversation(item: Item) -> list[dict]:
    """The prompt messages followed by the answer as the assistant's turn."""
    messages, answer = item
    return [*messages, {"role": "assistant", "content": answer}]


def check_renders(tokenizer, name: str, prompts: Sequence[list[dict]], **options) -> None:
    """Every prompt, with an answer, renders through ``tokenizer``'s chat template."""
    if not getattr(tokenizer, "chat_template", None) and "chat_template" not in options:
        raise ConfigError(
            f"the scorer's tokenizer {name!r} has no chat template: it cannot render (prompt, "
            "answer) as a conversation. Use a chat model's tokenizer."
        )
    for index, messages in enumerate(prompts):
        try:
            tokenizer.apply_chat_template(
                conversation((messages, PLACEHOLDER_ANSWER)), tokenize=False, **options
            )
        except Exception as error:  # jinja's TemplateError, raise_exception(...) of templates
            raise ConfigError(
                f"the chat template of the scorer's tokenizer {name!r} cannot render prompt "
                f"{index} ({[m['role'] for m in messages]}): {error}. Use a scorer whose "
                "template accepts these roles, or drop such prompts (e.g. system messages)."
            ) from None


class SequenceClassifierScorer(Scorer):
    """A sequence-classification reward model scoring ``prompt + answer`` in its chat template.

    Args:
        name_or_path: hub id or local folder of the reward model (safetensors).
        output_field: the output's field holding the reward when it is not ``logits[:, 0]`` of a
            one-output head (ArmoRM-Llama3-8B: ``score``); None: ``logits``, and a model with
            more than one output (``num_labels``) is refused.
        torch_dtype: dtype the reward model runs in.
        batch_size: conversations per forward pass.
        max_length: longest conversation in tokens (longer ones lose their oldest tokens);
            None: the model's ``max_position_embeddings``.
        trust_remote_code: allow model code from the hub (ArmoRM needs it).
    """

    def __init__(
        self,
        name_or_path: str,
        output_field: str | None = None,
        torch_dtype: str = "float32",
        batch_size: int = 8,
        max_length: int | None = None,
        trust_remote_code: bool = False,
    ) -> None:
        if batch_size < 1:
            raise ConfigError(f"scorer batch_size must be >= 1, got {batch_size}.")
        self.name_or_path = str(name_or_path)
        self.output_field = output_field
        self.torch_dtype = torch_dtype
        self.batch_size = batch_size
        self.max_length = max_length
        self.trust_remote_code = trust_remote_code
        self.scorer = None

    def check(self, prompts: Sequence[list[dict]]) -> None:
        """The reward model exists and is a sequence classifier (a causal LM or an adapter
        folder is named as such), one output unless ``output_field`` names the reward, its
        tokenizer fits its embedding table and renders every prompt with an answer."""
        from transformers import AutoTokenizer

        from treg_lightning.answers.reward_model import check_reward_model
        from treg_lightning.models.preflight import check_vocabulary

        setting = "scorer.name_or_path"
        facts = check_reward_model(self.name_or_path, setting, self.output_field,
                                   self.trust_remote_code)  # fmt: skip
        tokenizer = AutoTokenizer.from_pretrained(
            self.name_or_path, trust_remote_code=self.trust_remote_code
        )
        check_vocabulary(facts, tokenizer, setting, "its own tokenizer", self.trust_remote_code)
        check_renders(tokenizer, self.name_or_path, prompts)

    def setup(self, device: torch.device) -> None:
        from treg_lightning.answers.reward_model import RewardModelScorer

        if self.scorer is None:
            self.scorer = RewardModelScorer(
                self.name_or_path, self.torch_dtype, self.batch_size, self.max_length,
                str(device), self.trust_remote_code, self.output_field,
            )  # fmt: skip

    def score(self, items: Sequence[Item]) -> list[float]:
        if self.scorer is None:
            raise RuntimeError("SequenceClassifierScorer.score before setup().")
        return self.scorer.score([conversation(item) for item in items])

    def fingerprint(self) -> dict[str, Any]:
        return {
            "scorer": "sequence-classifier",
            "model": _identity(self.name_or_path),
            "output_field": self.output_field,
            "torch_dtype": self.torch_dtype,
            "max_length": self.max_length,
        }


class ImplicitRewardScorer(Scorer):
    """``beta * (log pi(y|x) - log pi_ref(y|x))`` of the answer ``y`` (per token when
    ``length_normalized``), the prompt rendered with the policy's chat template as in training
    and the answer tokenized on its own plus the end-of-turn token.

    Args:
        policy: the trained policy (hub id, folder, ``.gguf`` or ``"smollm2"``; a checkpoint
            exported with ``treg export``).
        reference: its reference model.
        beta: scale of the log-ratio (> 0; it changes no ranking).
        length_normalized: divide by the answer's length in tokens (SimPO's reward).
        torch_dtype: dtype both models run in.
        batch_size: conversations per forward pass.
        max_length: longest prompt + answer in tokens; longer ones lose their oldest prompt
            tokens.
        chat_template: a Jinja template replacing the policy tokenizer's.
        trust_remote_code: allow model code from the hub.
    """

    def __init__(
        self,
        policy: str,
        reference: str,
        beta: float = 1.0,
        length_normalized: bool = True,
        torch_dtype: str = "float32",
        batch_size: int = 8,
        max_length: int = 4096,
        chat_template: str | None = None,
        trust_remote_code: bool = False,
    ) -> None:
        if beta <= 0:
            raise ConfigError(f"the implicit reward's beta must be > 0, got {beta}.")
        if batch_size < 1 or max_length < 2:
            raise ConfigError(
                f"scorer batch_size ({batch_size}) must be >= 1 and max_length ({max_length}) >= 2."
            )
        self.policy = str(policy)
        self.reference = str(reference)
        self.beta = beta
        self.length_normalized = length_normalized
        self.torch_dtype = torch_dtype
        self.batch_size = batch_size
        self.max_length = max_length
        self.chat_template = chat_template
        self.trust_remote_code = trust_remote_code
        self.models: list | None = None
        self.tokenizer = None

    def _pair_tokenizer(self):
        from treg_lightning.data.tokenize import PairTokenizer
        from treg_lightning.models.loading import load_tokenizer

        if self.tokenizer is None:
            tokenizer = load_tokenizer(self.policy, self.trust_remote_code)
            self.tokenizer = PairTokenizer(
                tokenizer, self.max_length, self.max_length - 1, self.chat_template
            )
        return self.tokenizer

    def check(self, prompts: Sequence[list[dict]]) -> None:
        """Two different causal LMs (the same model twice scores every answer 0 and drops every
        prompt as tied), each existing and reading the ids of the policy's tokenizer, which
        tokenizes every answer for both; that tokenizer renders every prompt."""
        from treg_lightning.models.preflight import check_model, check_vocabulary, model_location

        if model_location(self.policy) == model_location(self.reference):
            raise ConfigError(
                f"scorer.policy {self.policy!r} and scorer.reference {self.reference!r} are the "
                f"same model ({model_location(self.policy)}): the implicit reward log pi - log "
                "pi_ref would be 0 for every answer and every prompt dropped as tied. Give the "
                "trained policy (e.g. a treg export folder) and the model it started from."
            )
        remote = self.trust_remote_code
        facts = check_model(self.policy, "scorer.policy", trust_remote_code=remote)
        try:
            pair_tokenizer = self._pair_tokenizer()
        except ConfigError as error:
            raise ConfigError(f"the implicit-reward scorer's policy {self.policy!r}: {error}")
        tokenizer = pair_tokenizer.tokenizer
        check_vocabulary(facts, tokenizer, "scorer.policy", "its own tokenizer", remote)
        check_model(self.reference, "scorer.reference", tokenizer=tokenizer,
                    fed=f"the tokenizer of scorer.policy {self.policy!r}",
                    trust_remote_code=remote)  # fmt: skip
        options = {"chat_template": self.chat_template} if self.chat_template else {}
        check_renders(tokenizer, self.policy, prompts, **options)

    def setup(self, device: torch.device) -> None:
        from treg_lightning.models.loading import load_causal_lm

        self._pair_tokenizer()
        if self.models is None:
            self.models = [
                load_causal_lm(name, self.torch_dtype, trust_remote_code=self.trust_remote_code,
                               device_type=device.type).to(device).eval().requires_grad_(False)
                for name in (self.policy, self.reference)
            ]  # fmt: skip
            self.device = device

    def sequence_ids(self, item: Item) -> tuple[list[int], int]:
        """Ids of prompt + answer (cut from the left to ``max_length``) and the answer's length."""
        pair_tokenizer = self._pair_tokenizer()
        prompt = pair_tokenizer.prompt_ids(item[0])
        answer = pair_tokenizer.response_ids(item[1])[: self.max_length - 1]
        ids = (prompt + answer)[-self.max_length :]
        return ids, len(answer)

    @torch.no_grad()
    def score(self, items: Sequence[Item]) -> list[float]:
        if self.models is None:
            raise RuntimeError("ImplicitRewardScorer.score before setup().")
        encoded = [self.sequence_ids(item) for item in items]
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i][0]))  # less padding
        scores: dict[int, float] = {}
        for start in range(0, len(order), self.batch_size):
            chosen = order[start : start + self.batch_size]
            values = self._score_batch([encoded[i] for i in chosen])
            scores.update(zip(chosen, values, strict=True))
        return [scores[i] for i in range(len(encoded))]

    def _score_batch(self, batch: list[tuple[list[int], int]]) -> list[float]:
        from treg_lightning.forward.logprobs import (
            causal_lm_token_logps,
            model_softcap,
        )

        # Right padding: a causal model's real tokens never see the padding after them.
        longest = max(len(ids) for ids, _ in batch)
        input_ids = torch.zeros((len(batch), longest), dtype=torch.long)
        attention = torch.zeros_like(input_ids)
        answer_mask = torch.zeros((len(batch), longest), dtype=torch.bool)
        for row, (ids, length) in enumerate(batch):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            attention[row, : len(ids)] = 1
            answer_mask[row, len(ids) - length : len(ids)] = True
        inputs = {
            "input_ids": input_ids.to(self.device),
            "attention_mask": attention.to(self.device),
            "use_cache": False,
        }
        mask = answer_mask.to(self.device)
        logps = [
            sequence_logps(causal_lm_token_logps(lm, inputs, mask, softcap=model_softcap(lm)), mask)
            for lm in self.models
        ]
        ratio = (logps[0] - logps[1]).double().cpu()
        if self.length_normalized:
            ratio = ratio / torch.tensor([length for _, length in batch], dtype=torch.float64)
        return (self.beta * ratio).tolist()

    def fingerprint(self) -> dict[str, Any]:
        return {
            "scorer": "implicit-reward",
            "policy": _identity(self.policy),
            "reference": _identity(self.reference),
            "beta": self.beta,
            "length_normalized": self.length_normalized,
            "torch_dtype": self.torch_dtype,
            "max_length": self.max_length,
            "chat_template": self.chat_template,
        }


def _identity(name_or_path: str) -> dict[str, Any]:
    """A model's name and, for a local folder, the size and modification time of its weights
    (a retrained model gets a new identity without hashing gigabytes)."""
    from pathlib import Path

    from treg_lightning.models.loading import resolve_model_source

    source = resolve_model_source(name_or_path)
    files = []
    if source.local:
        path = Path(source.path)
        for file in sorted(path.rglob("*")) if path.is_dir() else [path]:
            if file.is_file() and file.suffix in (".safetensors", ".gguf", ".bin"):
                stat = file.stat()
                files.append([str(file.resolve()), stat.st_size, stat.st_mtime_ns])
    return {"name": str(name_or_path), "files": files}
