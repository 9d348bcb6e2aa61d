"""Prompt sets for ``treg predict`` and ``treg pairs``: the data's prompts or a prompts file.

A prompt is ``{"index", "messages", "instruction", "prompt_ids", ...}``: the chat messages
(ending with the user's turn), the AlpacaEval ``instruction`` (the last user turn), and the
prompt token ids, made exactly as in training (:meth:`PairTokenizer.prompt_ids`, cut from the
left to ``max_prompt_length``), so the policy is asked in the format it was trained on.

The data's prompts are those of the pairs training kept (rows it skipped are not asked); a
prompts file is read by :func:`treg_lightning.data.prompt_files.read_prompts_file` (its formats,
the rows it accepts and the fields it carries are described there).
"""

from __future__ import annotations

import json
from typing import Any

from lightning.pytorch.utilities import rank_zero_info

from treg_lightning.data.errors import SkipReport
from treg_lightning.data.prompt_files import read_prompts_file
from treg_lightning.data.tokenize import PairTokenizer
from treg_lightning.errors import ConfigError


def instruction_of(messages: list[dict]) -> str:
    """AlpacaEval's ``instruction``: the last user turn."""
    return next(m["content"] for m in reversed(messages) if m["role"] == "user")


def build_prompt_set(
    prompts: list[dict[str, Any]], pair_tokenizer: PairTokenizer, report: SkipReport
) -> list[dict[str, Any]]:
    """Prompt ids for each prompt (as in training); prompts cut to ``max_prompt_length`` are
    counted in ``report.truncated["prompt"]``."""
    out = []
    for index, prompt in enumerate(prompts):
        ids = pair_tokenizer.truncated_prompt_ids(prompt["messages"], report)  # as in training
        out.append(
            {
                "index": index,
                "messages": prompt["messages"],
                "instruction": instruction_of(prompt["messages"]),
                "prompt_ids": ids,
                "extra": prompt.get("extra", {}),
            }
        )
    return out


def data_prompts(datamodule, split: str) -> list[dict[str, Any]]:
    """The distinct prompts of a split of a :class:`PreferenceDataModule`, in data order, with
    the prompt ids training used (pairs sharing a prompt give one prompt)."""
    rows = datamodule.tokenized_rows()
    if not rows.get(split):
        raise ConfigError(
            f"the data has no {split!r} pairs to take prompts from (splits: "
            f"{sorted(k for k, v in rows.items() if v)}). Set data.val_fraction or "
            "data.val_source for held-out prompts, --prompts.split train, or give "
            "--prompts.file FILE."
        )
    seen, out = set(), []
    for row in rows[split]:
        key = json.dumps(row["prompt"], sort_keys=True)
        if key in seen:
            continue
        seen.add(key)
        out.append(
            {
                "index": len(out),
                "messages": row["prompt"],
                "instruction": instruction_of(row["prompt"]),
                "prompt_ids": list(row["prompt_ids"]),
                "extra": {"pair_index": row.get("index")},
            }
        )
    repeated = len(rows[split]) - len(out)
    rank_zero_info(
        f"prompts: {len(out)} distinct prompts of the {split} split"
        + (f" ({repeated} pairs repeat an earlier prompt)" if repeated else "")
    )
    return out


def load_prompt_set(
    datamodule, prompts_file: str | None, split: str, limit: int | None = None
) -> list[dict[str, Any]]:
    """The prompts of ``prompts_file`` (tokenized with the data's tokenizer and lengths) or of
    the data's ``split``; the first ``limit`` only when set."""
    if prompts_file is None:
        prompt_set = data_prompts(datamodule, split)
    else:
        tokenizer = datamodule.get_tokenizer()
        pair_tokenizer = PairTokenizer(
            tokenizer,
            datamodule.max_length,
            datamodule.max_prompt_length,
            datamodule.chat_template,
        )
        report = SkipReport()
        prompt_set = build_prompt_set(read_prompts_file(prompts_file), pair_tokenizer, report)
        cut = report.truncated["prompt"]
        rank_zero_info(
            f"prompts: {len(prompt_set)} from {prompts_file}"
            + (f"; {cut} cut from the left to data.max_prompt_length" if cut else "")
        )
    return prompt_set[:limit] if limit is not None else prompt_set
