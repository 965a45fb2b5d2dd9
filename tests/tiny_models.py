"""Tiny randomly initialised HF models and a tokenizer trained in code: no downloads."""

from __future__ import annotations

import copy
from functools import lru_cache

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from rotalabs_steer.datasets import load_refusal_pairs

HIDDEN = 64
NUM_LAYERS = 4
VOCAB = 512


def corpus() -> list[str]:
    dataset = load_refusal_pairs()
    return dataset.positives + dataset.negatives


@lru_cache(maxsize=None)
def _trained_tokenizer(with_bos: bool) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(corpus(), trainer)
    if with_bos:
        tokenizer.post_processor = processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", tokenizer.token_to_id("<s>"))]
        )
    return tokenizer


def make_tokenizer(with_bos: bool = True, pad: bool = True, padding_side: str = "right") -> PreTrainedTokenizerFast:
    """A fresh tokenizer each call (tests may change its settings)."""
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=copy.deepcopy(_trained_tokenizer(with_bos)),
        bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        pad_token="<pad>" if pad else None,
    )
    tokenizer.padding_side = padding_side
    return tokenizer


def make_model(kind: str, seed: int = 0, dtype: torch.dtype = torch.float32):
    torch.manual_seed(seed)
    if kind == "llama":
        config = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=128,
                             num_hidden_layers=NUM_LAYERS, num_attention_heads=4, num_key_value_heads=2,
                             max_position_embeddings=1024, bos_token_id=1, eos_token_id=2, pad_token_id=0)
        model = LlamaForCausalLM(config)
    elif kind == "qwen3":
        config = Qwen3Config(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=128,
                             num_hidden_layers=NUM_LAYERS, num_attention_heads=4, num_key_value_heads=2,
                             head_dim=16, max_position_embeddings=1024)
        model = Qwen3ForCausalLM(config)
    elif kind == "gpt2":
        config = GPT2Config(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=NUM_LAYERS, n_head=4, n_positions=1024,
                            bos_token_id=1, eos_token_id=2)
        model = GPT2LMHeadModel(config)
    else:
        raise ValueError(kind)
    return model.to(dtype).eval()


MODEL_KINDS = ("llama", "qwen3", "gpt2")


def refusal_pairs(n: int = 6) -> list[dict]:
    """The first ``n`` shipped refusal pairs (different lengths), as the documented list of dicts."""
    return [{"positive": p.positive, "negative": p.negative} for p in list(load_refusal_pairs())[:n]]


def hook_count(model) -> int:
    """Forward hooks and pre-hooks on every module of ``model``: 0 once a library is done with it."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
