"""Batched generation of answers: sampling settings, the end-of-turn stop ids and two backends.

A backend turns prompt token ids into answer token ids. :class:`TransformersBackend` (the
default, tested path) runs ``model.generate`` on left-padded batches; :class:`VLLMBackend` runs
vLLM (``pip install treg-lightning[vllm]``, GPU) and is only imported when chosen
(``--backend treg_lightning.answers.generation.VLLMBackend``). Both stop at the chat template's
end-of-turn token (:func:`stop_token_ids`) and return one :class:`Generation` per prompt.

Greedy decoding (``temperature: 0``) is deterministic; sampled decoding seeds every batch from
``(seed, batch key)``, so a batch gives the same answers however the run was split or resumed.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from treg_lightning.errors import ConfigError


@dataclass(frozen=True)
class Decoding:
    """How answers are decoded (``--sampling.*`` of ``treg pairs``, which seeds each sample
    itself: ``--pairs.seeds``)."""

    max_new_tokens: int = 512
    """The most tokens an answer may have (its end-of-turn token included)."""

    temperature: float = 0.0
    """0 decodes greedily (deterministic); > 0 samples."""

    top_p: float = 1.0
    """Nucleus sampling mass (1.0: the whole distribution); ignored when greedy."""

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ConfigError(f"--sampling.max_new_tokens must be >= 1, got {self.max_new_tokens}.")
        if self.temperature < 0:
            raise ConfigError(
                f"--sampling.temperature must be >= 0 (0: greedy), got {self.temperature}."
            )
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"--sampling.top_p must be in (0, 1], got {self.top_p}.")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass(frozen=True)
class SamplingSettings(Decoding):
    """How answers are decoded, and the seed of their sampling (``--sampling.*`` of ``treg
    predict``; what a backend generates with)."""

    seed: int = 0
    """Seeds the sampling of every batch (with the batch's key)."""


@dataclass(frozen=True)
class Generation:
    """One answer.

    Attributes:
        token_ids: the answer's tokens, cut before the end-of-turn token.
        finish_reason: ``"stop"`` (the end-of-turn token came) or ``"length"`` (max_new_tokens).
    """

    token_ids: list[int]
    finish_reason: str


def stop_token_ids(tokenizer, model: nn.Module | None = None) -> list[int]:
    """Ids that end an answer: the tokenizer's EOS (the end-of-turn token the training responses
    end with, see data/tokenize.py) plus the model's ``generation_config.eos_token_id`` (Llama-3
    instruct lists ``<|eot_id|>`` there)."""
    ids = [tokenizer.eos_token_id]
    config = getattr(model, "generation_config", None)
    extra = getattr(config, "eos_token_id", None)
    ids += extra if isinstance(extra, (list, tuple)) else [extra]
    ids = list(dict.fromkeys(int(i) for i in ids if i is not None))
    if not ids:
        raise ConfigError(
            "the tokenizer has no eos_token (the end-of-turn token): generation could not stop "
            "at the end of the answer. Use the tokenizer of a chat model."
        )
    return ids


def cut_at_stop(token_ids: Sequence[int], stop_ids: Sequence[int], max_new_tokens: int):
    """:class:`Generation` of raw generated ids: cut before the first stop id."""
    stops = set(stop_ids)
    for position, token in enumerate(token_ids):
        if token in stops:
            return Generation(list(token_ids[:position]), "stop")
    # No end-of-turn token: generate() only stops a row early once it emitted one.
    return Generation(list(token_ids[:max_new_tokens]), "length")


def batch_seed(seed: int, key: str) -> int:
    """A 63-bit seed for one batch, from the run's seed and the batch's key."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def left_pad(prompt_ids: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, ...]:
    """``input_ids`` and ``attention_mask`` ``[batch, longest]``, padded on the left (generated
    tokens then follow every prompt directly)."""
    longest = max(len(ids) for ids in prompt_ids)
    input_ids = torch.full((len(prompt_ids), longest), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompt_ids), longest), dtype=torch.long)
    for row, ids in enumerate(prompt_ids):
        if ids:
            input_ids[row, longest - len(ids) :] = torch.tensor(list(ids), dtype=torch.long)
            attention_mask[row, longest - len(ids) :] = 1
    return input_ids, attention_mask


class PolicyLoader(Protocol):
    """What a backend gets to load the policy (see predictions.PolicySource)."""

    def load(self) -> nn.Module: ...

    def folder(self, work_dir: Path) -> Path: ...


class GenerationBackend:
    """Generates answers for batches of prompt ids (subclass it; chosen by ``class_path``).

    Attributes:
        setup_on_every_rank: :meth:`setup` is a collective of the process group (every rank
            must call it, together, even a rank with no shard left); False: a rank sets up only
            when it has shards to generate.
    """

    setup_on_every_rank = False

    def prepare(self, policy: PolicyLoader, work_dir: Path) -> None:
        """Write what every rank's :meth:`setup` reads (e.g. the policy exported as a Hugging
        Face folder); called on rank 0 alone, while the other ranks wait, before any
        :meth:`setup`. Does nothing by default."""

    def setup(self, policy: PolicyLoader, tokenizer, device: torch.device, work_dir: Path):
        """Load the policy; called once per process before :meth:`generate`."""
        raise NotImplementedError

    def generate(
        self, prompt_ids: Sequence[Sequence[int]], sampling: SamplingSettings, key: str
    ) -> list[Generation]:
        """One :class:`Generation` per prompt; ``key`` names the batch (it seeds sampling)."""
        raise NotImplementedError

    def fingerprint(self) -> dict[str, Any]:
        """What about the backend changes the answers (part of the run's fingerprint)."""
        raise NotImplementedError

    def check(self) -> None:
        """Refuse, at start-up (before any model loads), a backend this machine cannot run.

        Raises:
            ConfigError: what is missing and what to do.
        """

    def check_world_size(self, world_size: int) -> None:
        """Refuse, at start-up, a backend that cannot run on ``world_size`` processes.

        Raises:
            ConfigError: what does not fit and what to do.
        """


class TransformersBackend(GenerationBackend):
    """``model.generate`` of Hugging Face transformers on left-padded batches (KV cache on).

    Args:
        compile: ``torch.compile`` the policy's forward (GPU; the first batches compile).
    """

    def __init__(self, compile: bool = False) -> None:
        self.compile = compile
        self.model: nn.Module | None = None
        self.stop_ids: list[int] = []

    def setup(self, policy: PolicyLoader, tokenizer, device: torch.device, work_dir: Path):
        model = policy.load().to(device).eval()
        if self.compile:
            model.forward = torch.compile(model.forward, dynamic=True)
        self.model = model
        self.stop_ids = stop_token_ids(tokenizer, model)
        pad = tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else self.stop_ids[0])
        self.device = device

    @torch.no_grad()
    def generate(
        self, prompt_ids: Sequence[Sequence[int]], sampling: SamplingSettings, key: str
    ) -> list[Generation]:
        from transformers import GenerationConfig

        if self.model is None:
            raise RuntimeError("TransformersBackend.generate before setup().")
        input_ids, attention_mask = left_pad(prompt_ids, self.pad_id)
        options: dict[str, Any] = {"do_sample": False}
        if not sampling.greedy:
            torch.manual_seed(batch_seed(sampling.seed, key))
            options = {"do_sample": True, "temperature": sampling.temperature, "top_k": 0}
            options["top_p"] = sampling.top_p
        # A config of our own: the model's generation_config may carry sampling defaults
        # (temperature, top_k, repetition_penalty) that would change the answers unasked.
        config = GenerationConfig(
            max_new_tokens=sampling.max_new_tokens,
            eos_token_id=self.stop_ids,
            pad_token_id=self.pad_id,
            use_cache=True,
            **options,
        )
        out = self.model.generate(
            input_ids=input_ids.to(self.device),
            attention_mask=attention_mask.to(self.device),
            generation_config=config,
        )
        new_tokens = out[:, input_ids.shape[1] :].tolist()
        return [cut_at_stop(ids, self.stop_ids, sampling.max_new_tokens) for ids in new_tokens]

    def fingerprint(self) -> dict[str, Any]:
        import transformers

        return {"engine": "transformers", "version": transformers.__version__}


VLLM_MISSING = (
    "--backend treg_lightning.answers.generation.VLLMBackend needs vLLM, which is not installed "
    "here: `pip install treg-lightning[vllm]` on a CUDA machine, or drop --backend to generate "
    "with "
    "the default treg_lightning.answers.generation.TransformersBackend."
)


class VLLMBackend(GenerationBackend):
    """vLLM generation (GPU; ``pip install treg-lightning[vllm]``). Imported only when chosen.

    vLLM reads a Hugging Face folder: a ``.ckpt`` policy is exported once, by rank 0, into the
    run's work folder (``<output>.parts/<fingerprint>/policy``) while the other ranks wait.

    Every process runs one engine of its own on its own device, the way vLLM supports under a
    torchrun-style launcher (Lightning's DDP launcher is one): ``distributed_executor_backend=
    "external_launcher"``, with ``RANK`` / ``LOCAL_RANK`` / ``WORLD_SIZE`` set for the engine's
    construction (``LOCAL_RANK``: the index of this process's CUDA device, where vLLM's worker
    puts the model), the engine in this process (vLLM turns its engine-core process off for
    this backend) and a seed per rank. The engines join the process group the launcher made
    (one model-parallel group of size 1 per rank), so building them is a collective: every
    rank sets up, even one with no shard left. The answers do not depend on the number of
    ranks: each request carries its own seed. ``tensor_parallel_size`` > 1 runs one process
    (``--trainer.devices 1``) whose engine spreads over that many GPUs (vLLM's own workers).

    Args:
        gpu_memory_utilization: share of the GPU memory vLLM may take.
        tensor_parallel_size: GPUs per engine (> 1 only with one process).
        max_model_len: longest prompt + answer; None: the model's.
        dtype: vLLM's dtype (``"auto"``: the checkpoint's).
        enforce_eager: skip CUDA graphs (faster start, slower decode).
    """

    setup_on_every_rank = True

    def __init__(
        self,
        gpu_memory_utilization: float = 0.85,
        tensor_parallel_size: int = 1,
        max_model_len: int | None = None,
        dtype: str = "auto",
        enforce_eager: bool = False,
    ) -> None:
        if tensor_parallel_size < 1:
            raise ConfigError(f"tensor_parallel_size must be >= 1, got {tensor_parallel_size}.")
        self.options = {
            "gpu_memory_utilization": gpu_memory_utilization,
            "tensor_parallel_size": tensor_parallel_size,
            "max_model_len": max_model_len,
            "dtype": dtype,
            "enforce_eager": enforce_eager,
        }
        self.engine = None

    def check(self) -> None:
        import importlib.util

        if importlib.util.find_spec("vllm") is None:
            raise ConfigError(VLLM_MISSING)

    def check_world_size(self, world_size: int) -> None:
        tensor = self.options["tensor_parallel_size"]
        if world_size > 1 and tensor > 1:
            raise ConfigError(
                f"VLLMBackend(tensor_parallel_size={tensor}) with {world_size} processes: each "
                "process runs its own engine on its own GPU, with its own prompts, so its engine "
                "cannot spread over other GPUs. Either keep the processes and set "
                "--backend.tensor_parallel_size 1, or run one process (--trainer.devices 1) "
                f"whose engine spreads over {tensor} GPUs."
            )

    def prepare(self, policy: PolicyLoader, work_dir: Path) -> None:
        policy.folder(work_dir)  # the export, written once (rank 0) for every rank's engine

    def setup(self, policy: PolicyLoader, tokenizer, device: torch.device, work_dir: Path):
        import os

        import torch.distributed as dist

        ranked = dist.is_available() and dist.is_initialized()
        rank, world_size = (dist.get_rank(), dist.get_world_size()) if ranked else (0, 1)
        self.check_world_size(world_size)
        folder = policy.folder(work_dir)  # prepare() wrote it: read here, not written again
        options = {k: v for k, v in self.options.items() if v is not None}
        if self.options["tensor_parallel_size"] == 1:
            options.update(distributed_executor_backend="external_launcher", seed=rank)
            local = engine_local_rank(device, os.environ.get("LOCAL_RANK"))
            variables = launcher_environment(rank, local, world_size, ranked)
            # The engine in this process: vLLM sets this itself for external_launcher (its
            # ParallelConfig) and asserts it; set before vllm.envs is first read, and kept.
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        else:  # one process: vLLM starts its own workers, on the visible GPUs
            variables = {}
        if device.type == "cuda":
            torch.cuda.set_device(device)
        with environment(variables):
            try:
                import vllm
            except ImportError as err:
                raise ConfigError(VLLM_MISSING) from err
            self.engine = vllm.LLM(model=str(folder), tokenizer=str(folder), **options)
        self.stop_ids = stop_token_ids(tokenizer)
        self._vllm = vllm

    def generate(
        self, prompt_ids: Sequence[Sequence[int]], sampling: SamplingSettings, key: str
    ) -> list[Generation]:
        params = self._vllm.SamplingParams(
            max_tokens=sampling.max_new_tokens,
            temperature=sampling.temperature,
            top_p=sampling.top_p if not sampling.greedy else 1.0,
            seed=batch_seed(sampling.seed, key),
            stop_token_ids=self.stop_ids,
            skip_special_tokens=True,
        )
        prompts = [{"prompt_token_ids": list(ids)} for ids in prompt_ids]
        results = self.engine.generate(prompts, params, use_tqdm=False)
        out = []
        for result in results:
            completion = result.outputs[0]
            cut = cut_at_stop(completion.token_ids, self.stop_ids, sampling.max_new_tokens)
            reason = "length" if completion.finish_reason == "length" else "stop"
            out.append(Generation(cut.token_ids, reason))
        return out

    def fingerprint(self) -> dict[str, Any]:
        return {"engine": "vllm", **self.options}


def engine_local_rank(device: torch.device, local_rank: str | None) -> int:
    """The ``LOCAL_RANK`` vLLM is given: the index of this process's CUDA device (vLLM's worker
    runs on ``cuda:<LOCAL_RANK>``, so ``--trainer.devices [2, 3]`` must give 2 and 3, not the
    launcher's 0 and 1); off CUDA the launcher's local rank (0 when unset, as Lightning reads
    it)."""
    if device.type == "cuda":
        return device.index if device.index is not None else torch.cuda.current_device()
    return int(local_rank or 0)


def launcher_environment(rank: int, local_rank: int, world_size: int, ranked: bool):
    """The variables vLLM's ``external_launcher`` reads (``RANK``, ``LOCAL_RANK``, and
    ``WORLD_SIZE``; ``MASTER_ADDR`` / ``MASTER_PORT`` only where no process group exists yet,
    for vLLM's own ``env://`` one of a single process)."""
    import os

    variables = {"RANK": str(rank), "LOCAL_RANK": str(local_rank), "WORLD_SIZE": str(world_size)}
    if not ranked:
        variables["MASTER_ADDR"] = os.environ.get("MASTER_ADDR") or "127.0.0.1"
        variables["MASTER_PORT"] = os.environ.get("MASTER_PORT") or str(_free_port())
    return variables


@contextlib.contextmanager
def environment(variables: dict[str, str]):
    """``os.environ`` with ``variables`` set inside the block, as it was after it (the
    launcher's own ``LOCAL_RANK`` is Lightning's to read later)."""
    import os

    saved = {name: os.environ.get(name) for name in variables}
    os.environ.update(variables)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
