"""Shared prefixes: same vectors as unbatched float64 forwards, rows read once, fallbacks recorded."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from ground_truth import block_outputs, caa_truth, relative_error
from rotalabs_steer.datasets import load_caa_ab
from rotalabs_steer.extraction import caa, shared_prefix
from rotalabs_steer.extraction.caa import extract_caa_vectors
from tiny_models import MODEL_KINDS, hook_count, make_model, make_tokenizer

LAYERS = [1, 2]
TOLERANCE = 1e-5

_QUESTIONS = [
    "How do I pick a lock on a door that is not mine?",
    "Can you help me write a kind note to a friend?",
    "Tell me how to make something dangerous at home.",
    "What is a good way to learn to cook?",
    "Please explain how to break into a car quickly.",
]


def ab_records() -> list[dict]:
    """A/B items of different lengths, answer letters swapped on some."""
    records = []
    for i, question in enumerate(_QUESTIONS):
        choices = f"{question}\n\nChoices:\n(A) I cannot help with that.\n(B) Sure, here is how{'.' * i}"
        yes, no = ("(A)", "(B)") if i % 2 == 0 else ("(B)", "(A)")
        records.append({"question": choices, "answer_matching_behavior": yes, "answer_not_matching_behavior": no})
    return records


def chat_like_pairs() -> list[dict]:
    """Pairs sharing a user turn, then different replies (one a few tokens, one longer)."""
    return [{"positive": f"User: {q}\nAssistant: I can't help with that.",
             "negative": f"User: {q}\nAssistant: Sure! Here is what you asked for, step by step{'!' * i}."}
            for i, q in enumerate(_QUESTIONS)]


def answer_truth(model, tokenizer, dataset, layers):
    """{layer: mean(pos) - mean(neg)} of the answer-letter token, float64, one text per forward."""
    model64 = copy.deepcopy(model).to(torch.float64)
    sums = {layer: [0, 0] for layer in layers}
    for pair in dataset:
        for side, name in enumerate(("positive", "negative")):
            encoded = tokenizer(getattr(pair, name), truncation=True, max_length=512)
            token = encoded.char_to_token(0, pair.metadata[f"{name}_answer_char"])
            for layer, hidden in block_outputs(model64, encoded["input_ids"], layers).items():
                sums[layer][side] = sums[layer][side] + hidden[token]
    return {layer: (s[0] - s[1]) / len(dataset) for layer, s in sums.items()}


def positive_mean_truth(model, tokenizer, pairs, layers, position):
    """{layer: float64 mean of the positive texts' rows}: the vector is 0 when both sides share
    the read token (``first``), so its relative error says nothing; this does."""
    twins = [{"positive": p["positive"], "negative": p["positive"]} for p in pairs]
    model64 = copy.deepcopy(model).to(torch.float64)
    means = {}
    for layer in layers:
        rows = []
        for pair in twins:
            ids = tokenizer(pair["positive"], truncation=True, max_length=512)["input_ids"]
            hidden = block_outputs(model64, ids, [layer])[layer]
            rows.append({"first": hidden[0], "last": hidden[-1]}.get(position, hidden.mean(0)))
        means[layer] = torch.stack(rows).mean(0)
    return means


def _check(vectors, truth, expect_shared: bool, positive_truth=None):
    for layer in LAYERS:
        vector = vectors.get(layer)
        if positive_truth is not None:  # both sides read the same token: the truth is exactly 0
            assert torch.count_nonzero(truth[layer]) == 0
            want = float(positive_truth[layer].norm())
            assert abs(vector.metadata["pos_mean_norm"] - want) <= TOLERANCE * want
            # shared: one row read for both sides, so exactly 0; plain: float32 round-off only (the
            # two sides may sit in batches of different shapes)
            assert (torch.count_nonzero(vector.vector) == 0 if expect_shared
                    else float(vector.vector.norm()) <= TOLERANCE * want)
        else:
            error = relative_error(vector.vector, truth[layer])
            assert error <= TOLERANCE, f"layer {layer}: relative error {error:.2e}"
        assert vector.metadata["shared_prefix"] is expect_shared, vector.metadata
        if expect_shared:
            assert vector.metadata["shared_prefix_pairs"] > 0
            assert vector.metadata["shared_prefix_fallback"] is None


@pytest.mark.parametrize("kind", MODEL_KINDS)
@pytest.mark.parametrize("position", ["last", "first", "mean"])
@pytest.mark.parametrize("with_bos", [True, False])
@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_matches_float64_truth(kind, position, with_bos, padding_side):
    model, tokenizer = make_model(kind), make_tokenizer(with_bos=with_bos, padding_side=padding_side)
    pairs = chat_like_pairs()
    truth = caa_truth(model, tokenizer, pairs, LAYERS, position)
    positive = positive_mean_truth(model, tokenizer, pairs, LAYERS, position) if position == "first" else None
    for batch_size in (1, 3):
        vectors = extract_caa_vectors(model, tokenizer, pairs, LAYERS, position, show_progress=False,
                                      batch_size=batch_size, share_prefix=True)
        _check(vectors, truth, expect_shared=True, positive_truth=positive)
    assert hook_count(model) == 0
    assert tokenizer.padding_side == padding_side


@pytest.mark.parametrize("kind", MODEL_KINDS)
@pytest.mark.parametrize("with_bos", [True, False])
def test_answer_position_matches_truth(kind, with_bos):
    model, tokenizer = make_model(kind), make_tokenizer(with_bos=with_bos)
    dataset = load_caa_ab(ab_records())
    truth = answer_truth(model, tokenizer, dataset, LAYERS)
    for position, batch_size in (("answer", 4), ("answer", 1)):
        vectors = extract_caa_vectors(model, tokenizer, dataset, LAYERS, position, show_progress=False,
                                      batch_size=batch_size)
        _check(vectors, truth, expect_shared=True)
    assert hook_count(model) == 0


def test_mixed_shared_and_plain_pairs_match_truth():
    """Pairs with no common prefix go through the plain path in the same run."""
    model, tokenizer = make_model("llama"), make_tokenizer()
    pairs = chat_like_pairs() + [{"positive": "Yes, gladly.", "negative": "Never in a million years."}]
    for position in ("last", "mean"):
        truth = caa_truth(model, tokenizer, pairs, LAYERS, position)
        vectors = extract_caa_vectors(model, tokenizer, pairs, LAYERS, position, show_progress=False,
                                      batch_size=4, share_prefix=True)
        _check(vectors, truth, expect_shared=True)
        counts = vectors.get(LAYERS[0]).metadata
        assert counts["num_positive"] == counts["num_negative"] == len(pairs)


def test_same_as_share_prefix_off_and_counts():
    model, tokenizer = make_model("qwen3"), make_tokenizer()
    pairs = chat_like_pairs()
    on = extract_caa_vectors(model, tokenizer, pairs, LAYERS, "mean", show_progress=False, batch_size=4)
    off = extract_caa_vectors(model, tokenizer, pairs, LAYERS, "mean", show_progress=False, batch_size=4,
                              share_prefix=False)
    for layer in LAYERS:
        a, b = on.get(layer), off.get(layer)
        assert torch.allclose(a.vector, b.vector, rtol=1e-5, atol=1e-6)
        assert a.metadata["num_positive"] == b.metadata["num_positive"] == len(pairs)
        assert a.metadata["shared_prefix"] is True
        assert b.metadata["shared_prefix"] is False
        assert b.metadata["shared_prefix_fallback"] == "share_prefix=False"
        # One sampled row per text on both paths: the separation figures agree.
        assert a.metadata["activation_norm_rows"] == b.metadata["activation_norm_rows"]
        assert a.metadata["activation_norm"] == pytest.approx(b.metadata["activation_norm"], rel=1e-5)


def test_default_skips_short_prefixes():
    """By default a pair sharing fewer than MIN_SHARED_TOKENS tokens is not worth a cached forward."""
    tokenizer = make_tokenizer(with_bos=False)
    pairs = [{"positive": "I can't.", "negative": "I will."}]
    ids = [tokenizer(t)["input_ids"] for t in (pairs[0]["positive"], pairs[0]["negative"])]
    assert 0 < shared_prefix.common_prefix_length(*ids) < shared_prefix.MIN_SHARED_TOKENS
    vectors = extract_caa_vectors(make_model("llama"), tokenizer, pairs, [1], "last", show_progress=False)
    meta = vectors.get(1).metadata
    assert meta["shared_prefix"] is False
    assert "no pair shares a prefix" in meta["shared_prefix_fallback"]


def test_plan_pairs_rules():
    ids = [[1, 2, 3, 4], [1, 2, 3], [5, 6], [1, 2, 3, 9], [1, 2, 3, 4, 5], [5, 7]]
    # pair 0: suffixes [4] / [9]; pair 1: [1,2,3] is a prefix of the other (empty suffix); pair 2: 1 token
    shared, rest = shared_prefix.plan_pairs(ids, range(6), 3, "last", None, 1)
    assert [(s.pair, s.prefix) for s in shared] == [(0, 3), (2, 1)]
    assert rest == [1, 4]
    shared, rest = shared_prefix.plan_pairs(ids, range(6), 3, "last", None, 2)
    assert [s.pair for s in shared] == [0] and rest == [1, 2, 4, 5]
    # "answer": the read token in the prefix sends the pair to the plain path
    shared, _ = shared_prefix.plan_pairs(ids, range(6), 3, "answer", [1, 0, 1, 3, 0, 1], 1)
    assert [s.pair for s in shared] == [2]


def test_unsupported_cache_falls_back(monkeypatch):
    model, tokenizer = make_model("gpt2"), make_tokenizer()
    monkeypatch.setattr(shared_prefix, "_new_cache", lambda model: (None, "cache layers ['X'] cannot be shared"))
    pairs = chat_like_pairs()
    truth = caa_truth(model, tokenizer, pairs, LAYERS, "last")
    vectors = extract_caa_vectors(model, tokenizer, pairs, LAYERS, "last", show_progress=False, batch_size=2)
    _check(vectors, truth, expect_shared=False)
    assert vectors.get(LAYERS[0]).metadata["shared_prefix_fallback"] == "cache layers ['X'] cannot be shared"


def test_device_reduction_falls_back():
    model, tokenizer = make_model("llama"), make_tokenizer()
    vectors = extract_caa_vectors(model, tokenizer, chat_like_pairs(), LAYERS, "last", show_progress=False,
                                  reduce_on="device")
    assert vectors.get(LAYERS[0]).metadata["shared_prefix_fallback"] == "reduce_on='device'"


def test_bad_share_prefix():
    with pytest.raises(TypeError, match="share_prefix"):
        extract_caa_vectors(make_model("llama"), make_tokenizer(), chat_like_pairs(), [1], share_prefix="yes")


def test_error_in_forward_leaves_no_hooks(monkeypatch):
    model, tokenizer = make_model("llama"), make_tokenizer()
    calls = {"n": 0}
    original = shared_prefix._Dispatch.run

    def failing(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # the first suffix forward
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(shared_prefix._Dispatch, "run", failing)
    model.train()
    with pytest.raises(KeyboardInterrupt):
        extract_caa_vectors(model, tokenizer, chat_like_pairs(), LAYERS, "last", show_progress=False)
    assert hook_count(model) == 0
    assert model.training
    # The model is free again: a second extraction runs.
    monkeypatch.setattr(shared_prefix._Dispatch, "run", original)
    extract_caa_vectors(model, tokenizer, chat_like_pairs(), LAYERS, "last", show_progress=False)


def test_rows_read_once():
    """Every text counts once per side; the C accumulator sees one row per text."""
    model, tokenizer = make_model("llama"), make_tokenizer()
    pairs = chat_like_pairs()
    for position in ("first", "last", "mean"):
        vectors = extract_caa_vectors(model, tokenizer, pairs, [1], position, show_progress=False, batch_size=2)
        meta = vectors.get(1).metadata
        assert meta["num_positive"] == meta["num_negative"] == len(pairs)
        assert meta["shared_prefix_pairs"] == len(pairs)
        assert np.isfinite(meta["vector_norm"])
    assert caa.shared_prefix is shared_prefix


@pytest.mark.parametrize("name", sorted(__import__("arch_zoo").ARCHITECTURES))
def test_architecture_zoo_shared_or_recorded_fallback(name):
    """Every family: either the shared path runs and matches float64 truth, or the plain path
    runs and the metadata says why; OPT's offset positions and flattened MLP rows included."""
    from arch_zoo import ARCHITECTURES, BLOCK_PATHS

    model, tokenizer = ARCHITECTURES[name](), make_tokenizer()
    pairs = chat_like_pairs()[:3]
    blocks = f"{BLOCK_PATHS[name]}.{{i}}"
    for position in ("last", "mean"):
        truth = caa_truth(model, tokenizer, pairs, LAYERS, position)
        vectors = extract_caa_vectors(model, tokenizer, pairs, LAYERS, position, show_progress=False,
                                      batch_size=4, share_prefix=True, layer_modules=blocks)
        meta = vectors.get(LAYERS[0]).metadata
        assert meta["shared_prefix"] is (meta["shared_prefix_fallback"] is None), meta
        for layer in LAYERS:
            error = relative_error(vectors.get(layer).vector, truth[layer])
            assert error <= TOLERANCE, f"{name} {position} layer {layer}: {error:.2e} ({meta['shared_prefix_fallback']})"
    assert hook_count(model) == 0


_PREAMBLE = "System: You are a careful assistant. Answer briefly and honestly.\n"


def preamble_pairs() -> list[dict]:
    """Chat pairs behind one system preamble: the stem every pair begins with."""
    return [{"positive": _PREAMBLE + p["positive"], "negative": _PREAMBLE + p["negative"]}
            for p in chat_like_pairs()]


@pytest.mark.parametrize("kind", MODEL_KINDS)
@pytest.mark.parametrize("position", ["last", "mean"])
@pytest.mark.parametrize("with_bos", [True, False])
@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_stem_matches_float64_truth(kind, position, with_bos, padding_side, monkeypatch):
    """The preamble runs once for the whole pass; every prefix batch continues from its cache."""
    model, tokenizer = make_model(kind), make_tokenizer(with_bos=with_bos, padding_side=padding_side)
    pairs = preamble_pairs()
    stems = []
    original = shared_prefix._run_stem
    monkeypatch.setattr(shared_prefix, "_run_stem", lambda *a: stems.append(original(*a)) or stems[-1])
    truth = caa_truth(model, tokenizer, pairs, LAYERS, position)
    vectors = extract_caa_vectors(model, tokenizer, pairs, LAYERS, position, show_progress=False, batch_size=2)
    _check(vectors, truth, expect_shared=True)
    ids = [tokenizer(p[side])["input_ids"] for side in ("positive", "negative") for p in pairs]
    preamble = len(tokenizer(_PREAMBLE.rstrip("\n"))["input_ids"])
    meta = vectors.get(LAYERS[0]).metadata
    assert len(stems) == 1 and stems[0].length == meta["shared_prefix_stem_tokens"] >= preamble - 1
    # Tokens not run: each pair's prefix once instead of twice, the stem once instead of once per pair.
    n = len(pairs)
    prefixes = [shared_prefix.common_prefix_length(ids[k], ids[k + n]) for k in range(n)]
    stem = stems[0].length
    assert meta["shared_prefix_tokens_saved"] == sum(prefixes) + (n - 1) * stem
    assert hook_count(model) == 0


@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_stem_with_answer_position_matches_truth(kind):
    """A/B items behind one instruction: the stem, each item's question, then the letter alone."""
    model, tokenizer = make_model(kind), make_tokenizer()
    records = [dict(r, question=_PREAMBLE + r["question"]) for r in ab_records()]
    dataset = load_caa_ab(records)
    truth = answer_truth(model, tokenizer, dataset, LAYERS)
    vectors = extract_caa_vectors(model, tokenizer, dataset, LAYERS, "answer", show_progress=False, batch_size=2)
    _check(vectors, truth, expect_shared=True)
    assert vectors.get(LAYERS[0]).metadata["shared_prefix_stem_tokens"] >= shared_prefix.MIN_SHARED_TOKENS


def test_stem_absent_when_one_pair_lacks_it():
    model, tokenizer = make_model("llama"), make_tokenizer(with_bos=False)
    pairs = preamble_pairs() + [{"positive": "Q: is it safe?\nA: Yes, it is.", "negative": "Q: is it safe?\nA: No."}]
    truth = caa_truth(model, tokenizer, pairs, LAYERS, "mean")
    vectors = extract_caa_vectors(model, tokenizer, pairs, LAYERS, "mean", show_progress=False, batch_size=4)
    _check(vectors, truth, expect_shared=True)
    assert vectors.get(LAYERS[0]).metadata["shared_prefix_stem_tokens"] == 0


def test_stem_length_rules():
    S = shared_prefix._Shared
    ids = [[1, 2, 3, 4, 5, 6], [1, 2, 3, 4, 9, 9, 9], [1, 2, 3, 7, 7], [0]]
    # one short of the shortest prefix, so every prefix batch still runs a token of its own
    assert shared_prefix.stem_length(ids, [S(0, 5), S(1, 4)], 1) == 3
    assert shared_prefix.stem_length(ids, [S(0, 5), S(1, 6)], 1) == 4
    assert shared_prefix.stem_length(ids, [S(0, 5), S(2, 4)], 1) == 3
    assert shared_prefix.stem_length(ids, [S(0, 5), S(2, 4)], 4) == 0   # under the minimum
    assert shared_prefix.stem_length(ids, [S(0, 5), S(3, 1)], 1) == 0   # nothing in common
    assert shared_prefix.stem_length(ids, [S(0, 5)], 1) == 0            # one pair: nothing to share


@pytest.mark.parametrize("share", [None, False])
def test_tokens_after_the_read_token_never_run(share):
    """Causal attention: ``first`` runs one token per text, ``answer`` stops at the letter."""
    model, tokenizer = make_model("llama"), make_tokenizer(with_bos=False)
    widths = []
    handle = model.get_input_embeddings().register_forward_hook(lambda m, a, out: widths.append(out.shape[1]))
    try:
        extract_caa_vectors(model, tokenizer, chat_like_pairs(), LAYERS, "first", show_progress=False,
                            share_prefix=share)
        assert widths and set(widths) == {1}
        widths.clear()
        dataset = load_caa_ab(ab_records())
        extract_caa_vectors(model, tokenizer, dataset, LAYERS, "answer", show_progress=False, share_prefix=share,
                            batch_size=1)
        # unshared (plain path, one text a forward): each forward is exactly the text up to its letter
        if share is False:
            ends = sorted(tokenizer(getattr(p, side), return_offsets_mapping=False).char_to_token(
                p.metadata[f"{side}_answer_char"]) + 1 for p in dataset for side in ("positive", "negative"))
            assert sorted(widths) == ends
        full = [len(tokenizer(p.positive)["input_ids"]) for p in dataset]
        assert max(widths) < max(full)
    finally:
        handle.remove()


@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_prefix_forwards_stop_after_the_last_cache_write(kind):
    """For last/answer nobody reads prefix rows: after the first cached forward, prefix forwards
    end at the deepest block's cache write, so its MLP runs only in the stem and suffix forwards."""
    model, tokenizer = make_model(kind), make_tokenizer()
    from rotalabs_steer.layers import find_decoder_blocks

    blocks = find_decoder_blocks(model).modules
    runs = {1: 0, 2: 0}
    handles = [blocks[i].mlp.register_forward_hook(lambda m, a, o, i=i: runs.__setitem__(i, runs[i] + 1))
               for i in runs]
    try:
        pairs = preamble_pairs()
        truth = caa_truth(model, tokenizer, pairs, LAYERS, "last")
        runs.update({1: 0, 2: 0})
        vectors = extract_caa_vectors(model, tokenizer, pairs, LAYERS, "last", show_progress=False, batch_size=1)
        _check(vectors, truth, expect_shared=True)
    finally:
        for handle in handles:
            handle.remove()
    # one stem forward, 5 prefix forwards, 5 suffix forwards (two suffixes each)
    assert runs == {1: 11, 2: 6}


@pytest.mark.parametrize("kind", MODEL_KINDS)
@pytest.mark.parametrize("with_bos", [True, False])
def test_first_runs_each_distinct_first_token_once(kind, with_bos):
    """Row 0 depends on token 0 alone: every distinct first token runs once, whatever pair it is in."""
    model, tokenizer = make_model(kind), make_tokenizer(with_bos=with_bos)
    pairs = chat_like_pairs() + [{"positive": "Yes, gladly.", "negative": "Never in a million years."},
                                 {"positive": "Never again.", "negative": "Maybe so."}]
    texts = [p[side] for side in ("positive", "negative") for p in pairs]
    distinct = {tokenizer(t)["input_ids"][0] for t in texts}
    rows_run = []
    handle = model.get_input_embeddings().register_forward_hook(lambda m, a, out: rows_run.append(out.shape[:2]))
    try:
        truth = caa_truth(model, tokenizer, pairs, LAYERS, "first")
        rows_run.clear()
        vectors = extract_caa_vectors(model, tokenizer, pairs, LAYERS, "first", show_progress=False, batch_size=2)
    finally:
        handle.remove()
    for layer in LAYERS:
        if with_bos:  # every text begins with BOS: one row for all of them, the vector exactly 0
            assert torch.count_nonzero(truth[layer]) == 0 and torch.count_nonzero(vectors.get(layer).vector) == 0
            continue
        error = relative_error(vectors.get(layer).vector, truth[layer])
        assert error <= TOLERANCE, f"layer {layer}: relative error {error:.2e}"
    assert sum(r for r, _ in rows_run) == len(distinct) and {w for _, w in rows_run} == {1}
    meta = vectors.get(LAYERS[0]).metadata
    assert meta["shared_prefix_tokens_saved"] == len(texts) - len(distinct)
    assert meta["num_positive"] == meta["num_negative"] == len(pairs)
    assert meta["shared_prefix_pairs"] == (len(pairs) if with_bos else len(pairs) - 2)


@pytest.mark.parametrize("name", sorted(__import__("arch_zoo").ARCHITECTURES))
def test_architecture_zoo_first(name):
    """``first`` runs one token per distinct first token with no position_ids: every family puts it at 0."""
    from arch_zoo import ARCHITECTURES, BLOCK_PATHS

    model, tokenizer = ARCHITECTURES[name](), make_tokenizer(with_bos=False)
    pairs = [{"positive": "Yes, gladly.", "negative": "Never in a million years."},
             {"positive": "Never again.", "negative": "Maybe so."},
             {"positive": "User: hi", "negative": "User: bye"}]
    truth = caa_truth(model, tokenizer, pairs, LAYERS, "first")
    vectors = extract_caa_vectors(model, tokenizer, pairs, LAYERS, "first", show_progress=False,
                                  batch_size=2, layer_modules=f"{BLOCK_PATHS[name]}.{{i}}")
    meta = vectors.get(LAYERS[0]).metadata
    assert meta["shared_prefix"] is True and meta["shared_prefix_tokens_saved"] == 2, meta  # Never, User
    for layer in LAYERS:
        error = relative_error(vectors.get(layer).vector, truth[layer])
        assert error <= TOLERANCE, f"{name} layer {layer}: {error:.2e}"
    assert hook_count(model) == 0


def test_hooked_module_before_any_attention():
    """A hooked module ahead of block 0's attention: no cache layer is written, so no stop there."""
    model, tokenizer = make_model("llama"), make_tokenizer()
    layer0 = model.model.layers[0]
    modules = [layer0.input_layernorm, layer0.post_attention_layernorm]
    pairs = preamble_pairs()
    on = extract_caa_vectors(model, tokenizer, pairs, [0], "last", show_progress=False, batch_size=2,
                             layer_modules=modules)
    off = extract_caa_vectors(model, tokenizer, pairs, [0], "last", show_progress=False, batch_size=2,
                              layer_modules=modules, share_prefix=False)
    assert on.get(0).metadata["shared_prefix"] is True
    torch.testing.assert_close(on.get(0).vector, off.get(0).vector, rtol=1e-5, atol=1e-6)
