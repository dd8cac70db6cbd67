"""Tiny random models and an offline tokenizer, built in-process: no network, no downloads."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from heft.models import LoadedModel
from heft.pipeline import HeftModel

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "boolq"
WORDS = [
    "yes",
    "no",
    "true",
    "false",
    "the",
    "a",
    "is",
    "of",
    "passage",
    "question",
    "answer",
    "cat",
    "dog",
    "red",
    "blue",
    "green",
    "one",
    "two",
    "three",
    "four",
    "five",
]


def make_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer over a small vocabulary (`Answer:` splits into `Answer`, `:`)."""
    vocab = {"<pad>": 0, "<unk>": 1, "<eos>": 2, "?": 3, ":": 4, "Answer": 5, "Question": 6}
    for word in WORDS:
        vocab.setdefault(word, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>")


def make_model(arch: str = "llama", vocab_size: int = 64, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    common = dict(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=0,
        initializer_range=0.2,
    )  # larger than default so that logits can move far
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    else:
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    return model.eval()


def make_heft(arch: str = "llama", seed: int = 0) -> HeftModel:
    return HeftModel(LoadedModel(make_model(arch, seed=seed), make_tokenizer(), f"tiny-{arch}", "0" * 64, []))


@pytest.fixture
def tokenizer() -> PreTrainedTokenizerFast:
    return make_tokenizer()


@pytest.fixture(params=["llama", "qwen2"])
def heft_model(request) -> HeftModel:
    return make_heft(request.param)


@pytest.fixture
def tiny_model_dir(tmp_path: Path) -> Path:
    """A tiny Llama + tokenizer saved as a normal HF folder, loadable by path."""
    folder = tmp_path / "tiny-llama"
    make_model("llama").save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    return folder
