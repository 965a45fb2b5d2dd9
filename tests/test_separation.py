"""Held-out separation: reservoir sampling in C, fold arithmetic, layer ranking."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rotalabs_steer import _core
from rotalabs_steer.extraction import extract_caa_vectors
from rotalabs_steer.extraction.separation import held_out_separation
from rotalabs_steer.vectors import SteeringVector, SteeringVectorSet
from rotalabs_steer.datasets import load_refusal_pairs
from tiny_models import HIDDEN, make_model, make_tokenizer


def test_reservoir_keeps_a_bounded_uniform_sample():
    hidden, capacity, rows = 3, 50, 1000
    acc = _core.Accumulator(1, hidden, 1, sample_rows=capacity, seed=7)
    values = torch.arange(rows, dtype=torch.float64)[:, None].expand(rows, hidden).contiguous()
    for start in range(0, rows, 64):  # batches, as extraction feeds them
        acc.add(0, values[start:start + 64], torch.zeros(len(values[start:start + 64]), dtype=torch.long))
    kept, groups = acc.samples(0)
    assert kept.shape == (capacity, hidden) and (groups == 0).all()
    ids = kept[:, 0].astype(int)
    assert len(set(ids)) == capacity  # no row twice
    assert (kept == ids[:, None]).all()  # rows are copied whole
    assert 250 < ids.mean() < 750  # drawn from the whole stream, not its head
    again = _core.Accumulator(1, hidden, 1, sample_rows=capacity, seed=7)
    for start in range(0, rows, 64):
        again.add(0, values[start:start + 64], torch.zeros(len(values[start:start + 64]), dtype=torch.long))
    assert (again.samples(0)[0] == kept).all()  # reproducible for a seed
    acc.reset()
    assert acc.samples(0)[0].shape == (0, hidden)


def test_sample_rows_are_the_selected_rows():
    acc = _core.Accumulator(1, 4, 2, sample_rows=10)
    hidden = torch.randn(3, 5, 4)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
    acc.add(0, hidden, torch.tensor([0, 1, 0]), mask=mask)
    rows, groups = acc.samples(0)
    want = torch.stack([hidden[b][mask[b].bool()].double().mean(0) for b in range(3)])
    np.testing.assert_allclose(rows, want.numpy(), rtol=1e-12)
    assert groups.tolist() == [0, 1, 0]


def planted_rows(rng, n, hidden, shift):
    pos = rng.normal(size=(n, hidden)) + shift
    neg = rng.normal(size=(n, hidden)) - shift
    return pos, neg


def figures_for(pos, neg, folds=5):
    """Fold sums and all rows, as extraction would produce them."""
    hidden = pos.shape[1]
    sums = np.zeros((2 * folds, hidden))
    counts = np.zeros(2 * folds, dtype=np.int64)
    rows, groups = [], []
    for i, (p, q) in enumerate(zip(pos, neg)):
        f = i % folds
        sums[2 * f] += p
        sums[2 * f + 1] += q
        counts[2 * f] += 1
        counts[2 * f + 1] += 1
        rows += [p, q]
        groups += [2 * f, 2 * f + 1]
    return held_out_separation(sums, counts, np.array(rows), np.array(groups))


def test_planted_signal_is_measured():
    rng = np.random.default_rng(0)
    direction = np.zeros(16)
    direction[0] = 1.5
    strong = figures_for(*planted_rows(rng, 100, 16, direction))
    none = figures_for(*planted_rows(rng, 100, 16, np.zeros(16)))
    assert strong["accuracy"] > 0.9 and strong["cohens_d"] > 3
    assert 0.3 < none["accuracy"] < 0.7 and abs(none["cohens_d"]) < 1  # held out: no overfit signal
    assert strong["sample_size"] == 200


def test_get_best_separation_ranks_the_informative_layer_first():
    def vector(layer, accuracy, d, scale):
        return SteeringVector("b", layer, torch.ones(4) * scale, "m",
                              metadata={"separation_accuracy": accuracy, "separation_cohens_d": d})
    vectors = SteeringVectorSet("b", [vector(1, 0.6, 0.5, 10.0), vector(2, 0.95, 2.0, 1.0),
                                      vector(3, 0.95, 3.0, 0.5)])
    assert vectors.get_best("separation").layer_index == 3  # accuracy ties, d decides
    assert vectors.get_best("norm").layer_index == 1
    bare = SteeringVectorSet("b", [SteeringVector("b", 0, torch.ones(4), "m")])
    with pytest.raises(ValueError, match="no separation figures"):
        bare.get_best("separation")


def test_extraction_records_separation(pairs):
    model, tokenizer = make_model("llama"), make_tokenizer()
    vectors = extract_caa_vectors(model, tokenizer, pairs, [0, 2], show_progress=False, batch_size=4,
                                  separation_sample=64)
    for v in vectors:
        assert 0.0 <= v.metadata["separation_accuracy"] <= 1.0
        assert v.metadata["separation_sample_size"] == 2 * len(pairs)
        assert v.metadata["separation_folds"] == 5
    off = extract_caa_vectors(model, tokenizer, pairs, [0, 2], show_progress=False, separation_sample=0)
    assert "separation_accuracy" not in off[0].metadata
    torch.testing.assert_close(off[0].vector, vectors[0].vector)
    with pytest.raises(ValueError, match="separation_sample"):
        extract_caa_vectors(model, tokenizer, pairs, [0], show_progress=False, separation_sample=-1)


def planted_signal_model():
    """A tiny Llama whose block 2 alone writes the label into its output.

    Texts end in token "A" (negative) or "B" (positive), whose embeddings are made identical,
    so no block can tell them apart from the residual stream. Block 2 adds +v at "B" tokens
    and -v at "A" tokens (reading the input ids the model was called with); block 3 removes
    the v component again and adds a large label-free term that varies from text to text:
    the biggest mean difference (the reference's "norm" pick) but no held-out signal.
    """
    model, tokenizer = make_model("llama", seed=11), make_tokenizer(with_bos=False)
    token_a, token_b = tokenizer(" A")["input_ids"][-1], tokenizer(" B")["input_ids"][-1]
    with torch.no_grad():
        model.model.embed_tokens.weight[token_b] = model.model.embed_tokens.weight[token_a]
    generator = torch.Generator().manual_seed(0)
    v = torch.randn(HIDDEN, generator=generator)
    v /= v.norm()
    mixing = torch.randn(HIDDEN, HIDDEN, generator=generator) * 40
    seen = {}

    def remember_ids(module, args, kwargs):
        seen["ids"] = kwargs["input_ids"]

    def write_label(module, args, output):
        label = (seen["ids"] == token_b).to(output.dtype) - (seen["ids"] == token_a).to(output.dtype)
        return output + label[..., None] * v

    def remove_label_add_noise(module, args, output):
        output = output - (output @ v)[..., None] * v
        noise = torch.tanh(output @ mixing) * 3.0
        return output + noise - (noise @ v)[..., None] * v

    model.register_forward_pre_hook(remember_ids, with_kwargs=True)
    model.model.layers[2].register_forward_hook(write_label)
    model.model.layers[3].register_forward_hook(remove_label_add_noise)
    return model, tokenizer


def test_separation_finds_the_planted_layer_where_norm_does_not():
    model, tokenizer = planted_signal_model()
    texts = [p.positive for p in load_refusal_pairs()] + [p.negative for p in load_refusal_pairs()]
    texts = [text.split("Assistant:")[-1].strip() for text in texts][:80]
    pairs = [{"positive": texts[2 * i] + " B", "negative": texts[2 * i + 1] + " A"} for i in range(40)]
    vectors = extract_caa_vectors(model, tokenizer, pairs, [0, 1, 2, 3], show_progress=False, batch_size=8)
    accuracy = {v.layer_index: v.metadata["separation_accuracy"] for v in vectors}
    assert accuracy[2] == 1.0
    assert max(accuracy[0], accuracy[1], accuracy[3]) <= 0.75, accuracy
    assert vectors.get_best("separation").layer_index == 2
    assert vectors.get_best("norm").layer_index == 3  # the reference's pick: the label-free noise
