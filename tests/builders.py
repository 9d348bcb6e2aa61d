"""Builders of the suite's tiny models, tokenizers and batches: one place, no downloads.

Test files and conftest files import them (``from builders import tiny_llama``: pytest puts
``tests/`` on ``sys.path`` for the root conftest); subprocess scripts of the tests add
``tests/`` to ``sys.path`` themselves.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from unittest import mock

import torch

# The checkout under test: what every subprocess of the suite must import first.
SRC = Path(__file__).resolve().parents[1] / "src"

# A chat template with role tags and an end-of-turn token, BOS first.
ROLE_TAGS = (
    "{{ bos_token }}{% for message in messages %}"
    "<|{{ message['role'] }}|>{{ message['content'] }}<|end|>"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
# ChatML, as SmolLM2 and Qwen write it, with and without a leading BOS.
CHATML_NO_BOS = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CHATML = "{{ bos_token }}" + CHATML_NO_BOS
# Gemma-2 style: no system role (the template raises on one), "model" for the assistant.
NO_SYSTEM = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}"
    "\n{{ m['content'] }}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
SIDES = ("chosen", "rejected")


def checkout_env(*paths, **variables) -> dict[str, str]:
    """``os.environ`` for a subprocess that imports this checkout's ``treg_lightning``:
    ``PYTHONPATH`` is ``SRC``, then ``paths``, then the caller's own (never an installed copy
    first); ``variables`` are set on top (e.g. ``OMP_NUM_THREADS="1"``)."""
    inherited = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    entries = [str(SRC), *map(str, paths), *inherited]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(entries), **variables}


def run_in_group(command: list[str], timeout: int, env: dict[str, str]) -> None:
    """Run ``command`` in its own process group (no inherited rank variables) and assert it
    exits 0; on timeout kill the group (launched ranks too) and fail with its stderr."""
    import pytest

    env = dict(env)
    for key in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_PORT"):
        env.pop(key, None)
    process = subprocess.Popen(
        command,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        _, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        _, stderr = process.communicate()
        pytest.fail(f"{command[1:3]} hung for {timeout} s:\n{stderr[-4000:]}")
    assert process.returncode == 0, stderr[-4000:]


def imported_from_checkout(module_file: str) -> bool:
    """Whether a subprocess's ``treg_lightning.__file__`` lies in this checkout's ``SRC``."""
    return Path(module_file).resolve().is_relative_to(SRC.resolve())


def byte_tokenizer(
    chat_template: str | None = ROLE_TAGS,
    *,
    specials: tuple[str, ...] = (),
    bos: str | None = "<s>",
    eos: str | None = "<|end|>",
    pad: str | None = "<pad>",
    adds_bos: bool = False,
):
    """Byte-level BPE with no merges: every byte is one token (ids 0-255 in the byte alphabet's
    sorted order), so any text round-trips and expected ids are easy to write by hand.

    Args:
        chat_template: the Jinja chat template (None: the tokenizer has none, like a base model).
        specials: atomic special tokens, given ids 256, 257, ... in this order.
        bos, eos, pad: the tokenizer's special tokens (added after ``specials`` when not in it).
        adds_bos: the tokenizer itself prepends BOS (like Llama-3 / Gemma), the setting where a
            careless pipeline writes BOS twice.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {char: index for index, char in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    for token in specials:
        vocab[token] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    if specials:
        backend.add_special_tokens(list(specials))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    if adds_bos:
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, vocab[bos])]
        )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=bos, eos_token=eos, pad_token=pad
    )
    tokenizer.chat_template = chat_template
    return tokenizer


def word_tokenizer(vocab_size: int):
    """Word-level tokenizer over ``t0 .. t{n-1}`` (pad ``t0``, unk ``t1``, eos ``t2``): for tests
    that write token ids directly."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(vocab_size)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="t1"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="t0", unk_token="t1", eos_token="t2"
    )


def tiny_llama(vocab_size: int, seed: int = 0, dtype: torch.dtype | None = None, **config):
    """A random 2-layer Llama (hidden 32, 4 heads / 2 KV heads, untied head), in eval mode.

    ``config`` overrides any ``LlamaConfig`` field (e.g. ``attn_implementation``,
    ``hidden_size``); the weights depend only on the shapes and ``seed``.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    settings = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 4096,
        "tie_word_embeddings": False,
        "bos_token_id": None,
        "eos_token_id": None,
        "pad_token_id": None,
        **config,
    }
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab_size, **settings)).eval()
    return model if dtype is None else model.to(dtype)


def save_tiny_model(path, tokenizer=None, seed: int = 0):
    """Save a tiny Llama and its tokenizer as a ``save_pretrained`` folder; returns ``path``."""
    tokenizer = tokenizer if tokenizer is not None else byte_tokenizer()
    model = tiny_llama(len(tokenizer), seed)
    model.config.bos_token_id = tokenizer.bos_token_id
    model.config.eos_token_id = tokenizer.eos_token_id
    model.config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def addition_pairs(n: int) -> list[tuple[str, str, str]]:
    """``n`` (prompt, chosen, rejected) triples: "Add i and i.", the sum, "No" repeated i + 1
    times (so every pair differs and the rejected side grows with i)."""
    return [(f"Add {i} and {i}.", f"{2 * i}.", "No" * (i + 1)) for i in range(n)]


def write_pairs(path: Path, n: int = 8, *, rows=None) -> Path:
    """A JSON lines file of ``{"prompt", "chosen", "rejected"}`` rows; returns ``path``.

    ``rows`` are (prompt, chosen, rejected) triples; by default ``addition_pairs(n)``.
    """
    rows = addition_pairs(n) if rows is None else rows
    lines = (json.dumps({"prompt": p, "chosen": c, "rejected": r}) + "\n" for p, c, r in rows)
    path.write_text("".join(lines))
    return path


def tiny_fit_args(
    model_dir,
    data,
    root,
    *extra: str,
    loss: str | None = "treg_lightning.losses.SimPOLoss",
    alpha: float | None = 0,
    optimizer: str = "torch.optim.AdamW",
    lr: float | None = None,
    rewards: str | None = "null",
    max_length: int = 48,
    max_prompt_length: int = 24,
    batch_size: int = 2,
    devices: int | None = 1,
    max_steps: int | None = 1,
    logger: str | None = "false",
    seed: int | None = 0,
) -> list[str]:
    """`treg` arguments (without the subcommand) for a short CPU run of the model in
    ``model_dir`` on the pairs file ``data``, with ``root`` as ``trainer.default_root_dir`` and
    ``extra`` last (so they override). No progress bar or model summary.

    The defaults are a plain loss: SimPO with ``regularizer.alpha=0`` and ``data.rewards=null``
    (the data carries no token rewards), one step on one device, no logger, seed 0. A keyword
    set to None leaves that setting to the config's default; ``optimizer`` is written only with
    ``lr``; ``logger="csv"`` is a CSVLogger writing under ``root``.
    """
    model = [f"--model.model={model_dir}"]
    if loss is not None:
        model.append(f"--model.loss={loss}")
    if alpha is not None:
        model.append(f"--model.regularizer.alpha={alpha}")
    if lr is not None:
        model += [f"--model.optimizer={optimizer}", f"--model.optimizer.lr={lr}"]
    data_args = [f"--data.source={data}"]
    if rewards is not None:
        data_args.append(f"--data.rewards={rewards}")
    data_args += [
        f"--data.max_length={max_length}",
        f"--data.max_prompt_length={max_prompt_length}",
        f"--data.batch_size={batch_size}",
    ]
    trainer = ["--trainer.accelerator=cpu"]
    if devices is not None:
        trainer.append(f"--trainer.devices={devices}")
    if max_steps is not None:
        trainer.append(f"--trainer.max_steps={max_steps}")
    trainer += ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]
    if logger == "csv":
        trainer += [
            "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
            f"--trainer.logger.save_dir={root}",
        ]
    elif logger is not None:
        trainer.append(f"--trainer.logger={logger}")
    trainer.append(f"--trainer.default_root_dir={root}")
    seeded = [] if seed is None else [f"--seed_everything={seed}"]
    return [*model, *data_args, *trainer, *seeded, *extra]


def annotate_args(root: Path) -> tuple[str, ...]:
    """Token rewards from the contrastive source, cached under ``root/cache``."""
    return (
        "--data.rewards=treg_lightning.rewards.ContrastiveRewards",
        f"--data.rewards.cache_dir={root / 'cache'}",
    )


# Raised by the loaders that ``no_model_load`` patches.
REACHED = AssertionError("reached a model load that the check should have preceded")
MODEL_LOADERS = (
    "treg_lightning.models.loading.load_causal_lm",  # the policy and the reference
    "treg_lightning.rewards.contrastive.load_causal_lm",  # the evaluator of ContrastiveRewards
)


@contextlib.contextmanager
def no_model_load(*extra_patches: str):
    """The model loaders, and the ``extra_patches`` targets (dotted paths), raise ``REACHED``:
    a check meant to come first fails the test if it came after a load."""
    with contextlib.ExitStack() as stack:
        for target in (*MODEL_LOADERS, *extra_patches):
            stack.enter_context(mock.patch(target, side_effect=REACHED))
        yield


def pair_batch(
    seed: int = 0, batch: int = 2, lengths=(12, 9), prompt: int = 5, vocab: int = 256
) -> dict[str, torch.Tensor]:
    """A batch of the pair contract: right padding (row 1 has 2 padding tokens per side), the
    response after ``prompt`` tokens, token rewards uniform in (-0.5, 0.5) on response tokens."""
    g = torch.Generator().manual_seed(seed)
    out = {"index": torch.arange(batch), "prompt_lengths": torch.full((batch,), prompt)}
    for side, length in zip(SIDES, lengths, strict=True):
        ids = torch.randint(0, vocab, (batch, length), generator=g)
        attention = torch.ones(batch, length, dtype=torch.long)
        attention[1, -2:] = 0
        response = torch.zeros(batch, length, dtype=torch.bool)
        response[:, prompt:] = True
        response &= attention.bool()
        out[f"{side}_input_ids"] = ids
        out[f"{side}_attention_mask"] = attention
        out[f"{side}_response_mask"] = response
        out[f"{side}_token_rewards"] = (torch.rand(batch, length, generator=g) - 0.5) * response
    return out


def tokenize_pair(tokenizer, example: dict, index: int) -> dict:
    """A row of the contract: the prompt through the chat template, each response on its own
    plus EOS (ids concatenated, never re-tokenized)."""
    text = tokenizer.apply_chat_template(
        example["prompt"], tokenize=False, add_generation_prompt=True
    )
    row = {**example, "index": index}
    row["prompt_ids"] = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    for side in SIDES:
        ids = list(tokenizer(example[side], add_special_tokens=False)["input_ids"])
        row[f"{side}_ids"] = ids + [tokenizer.eos_token_id]
    return row


class Annotator:
    """The contrastive scorer and the chunked cache build, composed as
    :class:`~treg_lightning.rewards.ContrastiveRewards` composes them, on a model given directly
    (tests pass tiny models; the source loads its own evaluator).

    ``stats`` adds ``chunks_done`` (chunks this object scored) to the scorer's counters and
    ``chunks`` lists them in order.
    """

    def __init__(
        self,
        template="instruct",
        batch_size: int = 8,
        store_reference_logps: bool = True,
        chunk_pairs: int = 32,
        max_context_length: int | None = None,
    ) -> None:
        from treg_lightning.rewards.annotate import ContrastiveScorer

        self.scorer = ContrastiveScorer(
            template, batch_size, store_reference_logps, max_context_length
        )
        self.chunk_pairs = chunk_pairs
        self.chunks: list[int] = []

    @property
    def stats(self) -> dict:
        return {**self.scorer.stats, "chunks_done": len(self.chunks)}

    def __call__(
        self, model, tokenizer, rows, work_dir, rank=None, world_size=None, on_chunk_done=None
    ):
        from treg_lightning.rewards.cache import build_in_chunks

        def done(c: int) -> None:
            self.chunks.append(c)
            if on_chunk_done is not None:
                on_chunk_done(c)

        return build_in_chunks(
            rows,
            work_dir,
            lambda chunk: self.scorer.score(model, tokenizer, chunk),
            self.chunk_pairs,
            rank=rank,
            world_size=world_size,
            on_chunk_done=done,
        )


def tiny_gemma2(vocab_size: int, seed: int = 0, **config):
    """A random 2-layer Gemma-2 (hidden 32, head_dim 8, eager attention, final-logit soft-capping
    3.0: small, so the capping visibly changes the logits)."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    settings = {
        "hidden_size": 32,
        "intermediate_size": 48,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 8,
        "query_pre_attn_scalar": 8,
        "final_logit_softcapping": 3.0,
        "attn_implementation": "eager",
        **config,
    }
    torch.manual_seed(seed)
    return Gemma2ForCausalLM(Gemma2Config(vocab_size=vocab_size, **settings))


def refused_before_training(args: list[str], capsys) -> str:
    """`treg ARGS` in-process must exit 2 with no traceback, no policy loaded and no training
    step run; returns what it printed to stderr."""
    import sys

    import pytest

    from treg_lightning.cli.main import cli_main

    with (
        no_model_load("treg_lightning.module.PreferenceModule.build_policy"),
        mock.patch("treg_lightning.module.PreferenceModule.training_step") as step,
        mock.patch.object(sys, "argv", ["treg"]),
        pytest.raises(SystemExit) as info,
    ):
        cli_main(args)
    err = capsys.readouterr().err
    assert info.value.code == 2 and "Traceback" not in err
    step.assert_not_called()
    return err


def save_model_folder(
    path, kind: str = "causal", tokenizer=None, seed: int = 0, with_tokenizer: bool = True, **config
):
    """A tiny Llama of ``kind`` saved as a folder, with ``tokenizer`` (default: the byte-level
    one; saved unless ``with_tokenizer`` is False): ``"causal"`` (LlamaForCausalLM),
    ``"classifier"`` (LlamaForSequenceClassification, one output), ``"bare"`` (LlamaModel), or
    ``"adapter"`` (a LoRA adapter alone, as ``treg export --adapter_only`` writes it, on a base
    saved beside it in ``path.parent / "base"``); ``config`` overrides LlamaConfig fields
    (``vocab_size`` defaults to the tokenizer's length). Returns ``path``."""
    from transformers import LlamaConfig, LlamaForSequenceClassification, LlamaModel

    tokenizer = tokenizer if tokenizer is not None else byte_tokenizer()
    vocab = config.pop("vocab_size", len(tokenizer))
    if kind == "causal":
        model = tiny_llama(vocab, seed, **config)
    elif kind == "adapter":
        from peft import LoraConfig, get_peft_model

        base = Path(path).parent / "base"
        save_model_folder(base, "causal", tokenizer, seed, vocab_size=vocab, **config)
        model = tiny_llama(vocab, seed, **config)
        model.name_or_path = str(base)  # what peft records as base_model_name_or_path
        model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    else:
        torch.manual_seed(seed)
        settings = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                    "num_attention_heads": 4, "num_key_value_heads": 2, **config}  # fmt: skip
        settings.update(vocab_size=vocab, num_labels=1, pad_token_id=tokenizer.pad_token_id)
        cls = LlamaForSequenceClassification if kind == "classifier" else LlamaModel
        model = cls(LlamaConfig(**settings)).eval()
    model.save_pretrained(path)
    if with_tokenizer:
        tokenizer.save_pretrained(path)
    return path


# Ten hand-written pairs the CLI tests train and answer on.
CLI_PAIRS = [
    ("What is 2 + 2?", "2 + 2 = 4.", "2 + 2 = 5, surely."),
    ("Name a color.", "Blue.", "A color is a number."),
    ("Say hi.", "Hi!", "No."),
    ("What is the capital of France?", "Paris.", "Berlin, probably."),
    ("Spell cat.", "C-A-T.", "K-A-T."),
    ("Is ice cold?", "Yes, ice is cold.", "Ice is hot."),
    ("Count to three.", "1, 2, 3.", "1, 3, 2."),
    ("What is 3 * 3?", "9.", "6."),
    ("Opposite of up?", "Down.", "Left."),
    ("Is the sky green?", "No, it is usually blue.", "Yes."),
]


def exporting_fit_args(model_dir: Path, root: Path, *extra: str) -> list[str]:
    """One step on contrastive token rewards, logged by CSVLogger, exported at the fit's end."""
    rows = [(f"Add {i}.", f"{i}.", "No" * (i + 1)) for i in range(6)]
    fit = tiny_fit_args(
        model_dir,
        write_pairs(root / "pairs.jsonl", rows=rows),
        root,
        "--model.scheduler=null",  # a constant lr: one step changes the weights
        *annotate_args(root),
        "--data.rewards.batch_size=12",
        "--trainer.callbacks+=treg_lightning.training.callbacks.ExportOnFitEnd",
        "--trainer.callbacks.heatmap_pairs=2",
        *extra,
        loss=None,
        alpha=None,
        lr=0.01,
        rewards=None,
        devices=None,
        logger="csv",
        seed=None,
    )
    return ["fit", *fit]


def one_step_fit_args(model_dir: Path, root: Path) -> list[str]:
    """One step of a plain fit on six rows (loss and devices the defaults)."""
    rows = [(f"Add {i}.", f"{i}.", "No" * (i + 1)) for i in range(6)]
    data = write_pairs(root / "pairs.jsonl", rows=rows)
    return tiny_fit_args(model_dir, data, root, loss=None, devices=None, seed=None)


BENCH = Path(__file__).resolve().parents[1] / "bench"


def load_bench(name: str):
    """The script ``bench/<name>.py`` imported as module ``name`` (``bench/`` on the path, so its
    own ``import credit_data`` and the like resolve)."""
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


# `--backend=pausekit.PauseAfter`: generation that stops, to be killed, after `calls` batches.
PAUSE_KIT = """
import time
from pathlib import Path
from treg_lightning.answers.generation import TransformersBackend

class PauseAfter(TransformersBackend):
    \"\"\"After `calls` generate calls, touch `marker` and wait to be killed.\"\"\"

    def __init__(self, calls: int = 2, marker: str = "paused"):
        super().__init__()
        self.calls, self.marker = calls, marker

    def generate(self, prompt_ids, sampling, key):
        if self.calls == 0:
            Path(self.marker).touch()
            time.sleep(600)
        self.calls -= 1
        return super().generate(prompt_ids, sampling, key)
"""


def write_pause_kit(folder: Path) -> Path:
    """``folder/pausekit.py`` (:data:`PAUSE_KIT`); run the subprocess with ``folder`` on its
    path (:func:`checkout_env`)."""
    path = folder / "pausekit.py"
    path.write_text(PAUSE_KIT)
    return path


def answer_args(model, data, prompts, out) -> list[str]:
    """The flags ``treg predict`` and ``treg pairs`` share in the answer tests: the model, the
    data at lengths 96 / 64 on CPU without a logger, a prompts file and the output file."""
    return [
        f"--model.model={model}",
        f"--data.source={data}",
        "--data.max_length=96",
        "--data.max_prompt_length=64",
        "--trainer.accelerator=cpu",
        "--trainer.logger=false",
        f"--prompts.file={prompts}",
        f"--output.path={out}",
    ]
