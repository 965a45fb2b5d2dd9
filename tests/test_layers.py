"""Decoder-block discovery and layer-index validation."""

from __future__ import annotations

import pytest
import torch
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

from rotalabs_steer.extraction import extract_caa_vector
from rotalabs_steer.layers import find_decoder_blocks, resolve_layer_indices
from tiny_models import NUM_LAYERS, VOCAB, make_model, make_tokenizer


def test_known_layouts():
    assert find_decoder_blocks(make_model("llama")).path == "model.layers"
    assert find_decoder_blocks(make_model("gpt2")).path == "transformer.h"
    torch.manual_seed(0)
    neox = GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=3,
                                            num_attention_heads=4, intermediate_size=128))
    blocks = find_decoder_blocks(neox)
    assert blocks.path == "gpt_neox.layers" and len(blocks) == 3


def test_gpt_neox_extraction_runs(pairs):
    torch.manual_seed(0)
    neox = GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=3,
                                            num_attention_heads=4, intermediate_size=128)).eval()
    vector = extract_caa_vector(neox, make_tokenizer(), pairs, 1, batch_size=4, show_progress=False)
    assert vector.dim == 64 and vector.norm > 0


def test_unknown_model_names_what_was_tried():
    with pytest.raises(ValueError, match="model.layers.*transformer.h.*layer_modules"):
        find_decoder_blocks(torch.nn.Sequential(torch.nn.Linear(2, 2)))


def test_override_by_template_and_list(pairs):
    model, tokenizer = make_model("llama"), make_tokenizer()
    auto = extract_caa_vector(model, tokenizer, pairs, 2, show_progress=False)
    by_template = extract_caa_vector(model, tokenizer, pairs, 2, show_progress=False,
                                     layer_modules="model.layers.{i}")
    by_list = extract_caa_vector(model, tokenizer, pairs, 2, show_progress=False,
                                 layer_modules=list(model.model.layers))
    assert torch.equal(auto.vector, by_template.vector) and torch.equal(auto.vector, by_list.vector)
    with pytest.raises(ValueError, match="matches no module"):
        find_decoder_blocks(model, "model.nothing.{i}")
    with pytest.raises(ValueError, match=r"\{i\}"):
        find_decoder_blocks(model, "model.layers")


@pytest.mark.parametrize("bad,error,fragment", [
    ([NUM_LAYERS], IndexError, "out of range"),
    ([-NUM_LAYERS - 1], IndexError, "out of range"),
    ([1.5], TypeError, r"layer_indices\[0\] must be an int"),
    ([True], TypeError, r"layer_indices\[0\] must be an int"),
    (["1"], TypeError, r"layer_indices\[0\] must be an int"),
    ([1, 1], ValueError, "more than once"),
    ([1, -3], ValueError, "more than once"),  # -3 is 1 in a 4-block model
    ([], ValueError, "at least one"),
    ("12", TypeError, "list of ints"),
])
def test_bad_layer_indices(bad, error, fragment):
    with pytest.raises(error, match=fragment):
        resolve_layer_indices(bad, NUM_LAYERS)
    assert resolve_layer_indices([3, -4, 1], NUM_LAYERS) == [3, 0, 1]
