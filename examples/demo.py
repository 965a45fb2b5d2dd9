"""`make demo`: extract refusal vectors with batching and save them.

This version runs on a tiny randomly initialised Llama built in code (no weights are
downloaded), so the numbers show the mechanics, not a real model's behaviour.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from rotalabs_steer import SteeringVectorSet, infer_model_config
from rotalabs_steer.datasets import load_refusal_pairs
from rotalabs_steer.extraction import extract_caa_vectors

OUT = Path("demo-out")


def tiny_model_and_tokenizer(texts: list[str]):
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=1000, special_tokens=["<pad>", "<unk>"],
                                                       show_progress=False))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token="<pad>", unk_token="<unk>")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=12,
                         num_attention_heads=8, num_key_value_heads=4)
    config._name_or_path = "tiny-random-llama (built in code)"
    return LlamaForCausalLM(config).eval(), tokenizer


def main() -> None:
    pairs = load_refusal_pairs()
    model, tokenizer = tiny_model_and_tokenizer(pairs.positives + pairs.negatives)
    print(f"model: {model.config._name_or_path}, {model.config.num_hidden_layers} blocks, "
          f"hidden {model.config.hidden_size} (random weights: a stand-in until the bundled model lands)")
    layers = infer_model_config(model).get_recommended_layers("refusal")
    start = time.perf_counter()
    vectors = extract_caa_vectors(model, tokenizer, pairs, layers, "last", batch_size=16)
    elapsed = time.perf_counter() - start
    print(f"\n{len(pairs)} pairs, layers {layers}, one batched pass: {elapsed:.2f} s\n")
    print(f"{'layer':>5}  {'norm':>10}  {'|pos mean|':>10}  {'|neg mean|':>10}  {'cos(pos,neg)':>12}")
    for v in sorted(vectors, key=lambda v: v.layer_index):
        m = v.metadata
        print(f"{v.layer_index:>5}  {v.norm:>10.4f}  {m['pos_mean_norm']:>10.4f}  {m['neg_mean_norm']:>10.4f}"
              f"  {m['cosine_pos_neg']:>12.6f}")
    vectors.save(OUT / "refusal")
    reloaded = SteeringVectorSet.load(OUT / "refusal")
    assert all(torch.equal(reloaded[i].vector, vectors[i].vector) for i in vectors.layers)
    print(f"\nsaved {len(vectors)} vectors (safetensors + JSON) to {OUT / 'refusal'}/ and reloaded them bit-exact")


if __name__ == "__main__":
    main()
