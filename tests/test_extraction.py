"""Extraction against float64 ground truth from unbatched per-text forwards."""

from __future__ import annotations

import copy
import inspect

import pytest
import torch

from ground_truth import block_outputs, caa_truth, relative_error
from rotalabs_steer import SteeringVector, SteeringVectorSet
from rotalabs_steer.datasets import ContrastPairDataset
from rotalabs_steer.extraction import extract_caa_vector, extract_caa_vectors
from tiny_models import MODEL_KINDS, NUM_LAYERS, make_model, make_tokenizer

LAYERS = [1, NUM_LAYERS - 1]  # a middle block and the last one (whose output is pre-final-norm)
TOLERANCE = 1e-5


@pytest.fixture(scope="module", params=MODEL_KINDS)
def model_and_truth(request):
    """One tiny model per architecture, with float64 truth for every token position."""
    from rotalabs_steer.datasets import load_refusal_pairs

    model = make_model(request.param)
    truth = {
        position: caa_truth(model, make_tokenizer(with_bos=position != "first"), pairs_for(position),
                            LAYERS, position)
        for position in ("last", "first", "mean")
    }
    return request.param, model, truth


def pairs_for(token_position: str) -> list[dict]:
    """Eight refusal pairs; for "first", only the replies, so first tokens differ.

    A causal model's first output depends on the first token alone, so a shared
    "User: ..." prefix (or a BOS token) would make every "first" vector zero.
    """
    from rotalabs_steer.datasets import load_refusal_pairs

    pairs = [{"positive": p.positive, "negative": p.negative} for p in list(load_refusal_pairs())[:8]]
    if token_position == "first":
        pairs = [{k: v.split("Assistant: ", 1)[1] for k, v in p.items()} for p in pairs]
    return pairs


@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("batch_size", [1, 3, 8])
@pytest.mark.parametrize("token_position", ["last", "first", "mean"])
def test_matches_float64_truth(model_and_truth, token_position, batch_size, padding_side):
    kind, model, truth = model_and_truth
    tokenizer = make_tokenizer(with_bos=token_position != "first", padding_side=padding_side)
    vectors = extract_caa_vectors(model, tokenizer, pairs_for(token_position), LAYERS, token_position,
                                  show_progress=False, batch_size=batch_size)
    for layer in LAYERS:
        error = relative_error(vectors[layer].vector, truth[token_position][layer])
        assert error <= TOLERANCE, f"{kind} layer {layer}: relative error {error:.2e}"
    assert tokenizer.padding_side == padding_side


def test_pair_order_does_not_matter(model_and_truth):
    kind, model, truth = model_and_truth
    reversed_pairs = list(reversed(pairs_for("last")))
    vector = extract_caa_vector(model, make_tokenizer(), reversed_pairs, 1, "last", batch_size=3,
                                show_progress=False)
    assert relative_error(vector.vector, truth["last"][1]) <= TOLERANCE


def test_layer_semantics_are_block_outputs():
    """Layer i is hidden_states[i + 1] for every block but the last."""
    model = make_model("llama")
    ids = make_tokenizer()("User: hello\nAssistant: hi there")["input_ids"]
    with torch.no_grad():
        hidden_states = model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states
    outputs = block_outputs(model, ids, list(range(NUM_LAYERS)))
    for layer in range(NUM_LAYERS - 1):
        torch.testing.assert_close(outputs[layer], hidden_states[layer + 1][0], rtol=0, atol=0)
    # The last entry of hidden_states is after the final norm: not the last block's output.
    assert not torch.allclose(outputs[NUM_LAYERS - 1], hidden_states[NUM_LAYERS][0])


def test_multi_layer_equals_single_layer(pairs):
    model, tokenizer = make_model("qwen3"), make_tokenizer()
    vectors = extract_caa_vectors(model, tokenizer, pairs, [0, 2, 3], "mean", show_progress=False, batch_size=4)
    for layer in (0, 2, 3):
        single = extract_caa_vector(model, tokenizer, pairs, layer, "mean", batch_size=4, show_progress=False)
        torch.testing.assert_close(vectors[layer].vector, single.vector, rtol=0, atol=0)


def test_negative_layer_index_counts_from_end(pairs):
    model, tokenizer = make_model("llama"), make_tokenizer()
    vector = extract_caa_vector(model, tokenizer, pairs, -1, show_progress=False)
    last = extract_caa_vector(model, tokenizer, pairs, NUM_LAYERS - 1, show_progress=False)
    assert vector.layer_index == NUM_LAYERS - 1
    torch.testing.assert_close(vector.vector, last.vector, rtol=0, atol=0)


def test_bfloat16_model_close_to_its_float32_copy(pairs):
    model16 = make_model("llama", dtype=torch.bfloat16)
    model32 = copy.deepcopy(model16).to(torch.float32)  # same (bf16-representable) weights
    tokenizer = make_tokenizer()
    for position in ("last", "mean"):
        v16 = extract_caa_vector(model16, tokenizer, pairs, 2, position, batch_size=4, show_progress=False)
        v32 = extract_caa_vector(model32, tokenizer, pairs, 2, position, batch_size=4, show_progress=False)
        # bf16 keeps 8 mantissa bits; activations drift by ~1e-2 relative through 3 blocks.
        assert relative_error(v16.vector, v32.vector.double()) < 5e-2
        assert v16.metadata["model_dtype"] == "bfloat16"


def test_metadata(pairs):
    model, tokenizer = make_model("gpt2"), make_tokenizer()
    dataset = ContrastPairDataset("refusal")
    for pair in pairs:
        dataset.add_pair(pair["positive"], pair["negative"])
    vector = extract_caa_vector(model, tokenizer, dataset, 1, "mean", batch_size=2, show_progress=False)
    assert isinstance(vector, SteeringVector)
    assert vector.behavior == "refusal" and vector.layer_index == 1 and vector.extraction_method == "caa"
    meta = vector.metadata
    assert meta["num_pairs"] == len(pairs) and meta["token_position"] == "mean"
    assert meta["num_positive"] == meta["num_negative"] == len(pairs)
    assert meta["vector_norm"] == pytest.approx(vector.norm, rel=1e-6)
    assert meta["pos_mean_norm"] > 0 and meta["neg_mean_norm"] > 0
    assert vector.vector.dtype == torch.float32 and vector.dim == model.config.n_embd
    listed = extract_caa_vector(model, tokenizer, pairs, 1, "mean", show_progress=False)
    assert listed.behavior == "unknown"


def test_documented_signatures():
    single = inspect.signature(extract_caa_vector).parameters
    assert list(single)[:7] == ["model", "tokenizer", "contrast_pairs", "layer_idx", "token_position",
                                "batch_size", "show_progress"]
    assert single["token_position"].default == "last" and single["batch_size"].default == 1
    assert single["show_progress"].default is True
    multi = inspect.signature(extract_caa_vectors).parameters
    assert list(multi)[:6] == ["model", "tokenizer", "contrast_pairs", "layer_indices", "token_position",
                               "show_progress"]
    assert multi["batch_size"].kind is inspect.Parameter.KEYWORD_ONLY


def test_returns_set_in_layer_order(pairs):
    vectors = extract_caa_vectors(make_model("llama"), make_tokenizer(), pairs, [3, 0], show_progress=False)
    assert isinstance(vectors, SteeringVectorSet) and vectors.layers == [0, 3] and len(vectors) == 2


def test_tokenizer_without_pad_falls_back_to_eos(pairs):
    model = make_model("llama")
    with_pad = extract_caa_vector(model, make_tokenizer(), pairs, 1, batch_size=8, show_progress=False)
    tokenizer = make_tokenizer(pad=False)
    assert tokenizer.pad_token is None
    without_pad = extract_caa_vector(model, tokenizer, pairs, 1, batch_size=8, show_progress=False)
    torch.testing.assert_close(with_pad.vector, without_pad.vector)
    assert tokenizer.pad_token is None


def test_generator_of_pairs_works(pairs):
    model, tokenizer = make_model("llama"), make_tokenizer()
    from_list = extract_caa_vector(model, tokenizer, pairs, 1, show_progress=False)
    from_generator = extract_caa_vector(model, tokenizer, (p for p in pairs), 1, show_progress=False)
    torch.testing.assert_close(from_list.vector, from_generator.vector, rtol=0, atol=0)


def test_progress_bar_counts_texts(pairs, capsys):
    extract_caa_vector(make_model("llama"), make_tokenizer(), pairs, 1, batch_size=4, show_progress=True)
    assert f"{2 * len(pairs)}/{2 * len(pairs)}" in capsys.readouterr().err


@pytest.mark.parametrize("chunk", [3, 256], ids=["chunks-of-3", "one-chunk"])
def test_answer_position_reads_the_answer_letter(monkeypatch, chunk):
    """CAA A/B items: the vector is read at the answer letter, wherever it sits in the text.

    Texts are tokenized in chunks; read indices must follow their texts across chunk borders.
    """
    import rotalabs_steer.extraction.batching

    monkeypatch.setattr(rotalabs_steer.extraction.batching, "TOKENIZE_CHUNK", chunk)
    from ground_truth import block_outputs
    from rotalabs_steer.datasets import load_caa_ab

    records = [
        {"question": f"Question {i}: will you help with task {i}?\n\nChoices:\n(A) Yes, gladly.\n(B) No, I decline.",
         "answer_matching_behavior": "(B)" if i % 2 else "(A)",
         "answer_not_matching_behavior": "(A)" if i % 2 else "(B)"}
        for i in range(6)
    ]
    dataset = load_caa_ab(records, behavior="refusal")
    model, tokenizer = make_model("llama"), make_tokenizer()
    model64 = copy.deepcopy(model).double()
    want = torch.zeros(64, dtype=torch.float64)
    for pair in dataset:
        for sign, side in ((1, "positive"), (-1, "negative")):
            text, char = getattr(pair, side), pair.metadata[f"{side}_answer_char"]
            encoding = tokenizer(text)
            token = encoding.char_to_token(char)
            assert tokenizer.decode(encoding["input_ids"][token]).strip() == text[char]
            want += sign * block_outputs(model64, encoding["input_ids"], [2])[2][token] / len(dataset)
    for batch_size in (1, 4):
        got = extract_caa_vector(model, tokenizer, dataset, 2, "answer", batch_size=batch_size, show_progress=False)
        assert relative_error(got.vector, want) <= TOLERANCE
    with pytest.raises(ValueError, match="positive_answer_char"):
        extract_caa_vector(model, tokenizer, [{"positive": "a b", "negative": "c d"}], 2, "answer",
                           show_progress=False)
