"""MLP and attention outputs: extract_caa_vectors(component=...), ActivationHook, extract_activations."""

from __future__ import annotations

import pytest
import torch

from ground_truth import block_outputs, caa_truth, relative_error
from rotalabs_steer import ActivationCache, ActivationHook, extract_activations
from rotalabs_steer.extraction import extract_caa_vector, extract_caa_vectors
from rotalabs_steer.layers import component_module, find_decoder_blocks
from tiny_models import MODEL_KINDS, hook_count, make_model, make_tokenizer, refusal_pairs

LAYER = 1
TOLERANCE = 1e-5




@pytest.fixture(scope="module", params=MODEL_KINDS)
def model(request):
    return make_model(request.param)


@pytest.mark.parametrize("component", ["mlp", "attn"])
@pytest.mark.parametrize("token_position", ["last", "mean"])
def test_component_vector_matches_float64_truth(model, component, token_position):
    tokenizer = make_tokenizer(padding_side="left")
    want = caa_truth(model, tokenizer, refusal_pairs(), [LAYER, 3], token_position, component=component)
    got = extract_caa_vectors(model, tokenizer, refusal_pairs(), [LAYER, 3], token_position, show_progress=False,
                              batch_size=4, component=component)
    for layer in (LAYER, 3):
        assert relative_error(got[layer].vector, want[layer]) <= TOLERANCE
        assert got[layer].metadata["component"] == component
    residual = extract_caa_vector(model, tokenizer, refusal_pairs(), LAYER, token_position, show_progress=False)
    assert relative_error(residual.vector, want[LAYER]) > 1e-2, "component= was ignored"
    assert hook_count(model) == 0


def test_component_names_across_layouts(model):
    block = find_decoder_blocks(model).modules[0]
    mlp, mlp_path = component_module(block, "mlp")
    attn, attn_path = component_module(block, "attn")
    assert mlp is getattr(block, mlp_path) and attn is getattr(block, attn_path) and mlp is not attn
    assert component_module(block, "residual") == (block, "")


def test_unknown_component_is_a_clear_error(model):
    with pytest.raises(ValueError, match="component must be one of"):
        extract_caa_vectors(model, make_tokenizer(), refusal_pairs(2), [1], show_progress=False, component="ffn")
    with pytest.raises(ValueError, match="component must be one of"):
        ActivationHook(model, [1], component="resid")
    block = torch.nn.Module()
    block.linear = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="children: linear"):
        component_module(block, "mlp")
    assert hook_count(model) == 0


@pytest.mark.parametrize("component", ["residual", "mlp", "attn"])
def test_extract_activations_reads_last_real_token_of_padded_rows(model, component):
    tokenizer = make_tokenizer(padding_side="right")
    texts = [refusal_pairs(3)[0]["positive"], "Short text.", refusal_pairs(3)[2]["negative"]]
    inputs = tokenizer(texts, return_tensors="pt", padding=True)
    assert not inputs["attention_mask"].all(), "the batch must contain padding"
    got = extract_activations(model, inputs, [0, LAYER], component, "last")
    for i, text in enumerate(texts):
        ids = tokenizer(text)["input_ids"]
        want = block_outputs(model, ids, [0, LAYER], component)
        for layer in (0, LAYER):
            assert got[layer].shape == (len(texts), 1, model.config.get_text_config().hidden_size)
            torch.testing.assert_close(got[layer][i, 0], want[layer][-1], rtol=1e-5, atol=1e-5)
    assert hook_count(model) == 0


def test_extract_activations_first_and_all(model):
    tokenizer = make_tokenizer()
    inputs = tokenizer([refusal_pairs(1)[0]["positive"]], return_tensors="pt")
    first = extract_activations(model, inputs, [LAYER], "residual", "first")[LAYER]
    every = extract_activations(model, inputs, [LAYER], "residual", "all")[LAYER]
    assert every.shape[:2] == inputs["input_ids"].shape
    torch.testing.assert_close(first[:, 0], every[:, 0])


def test_extract_activations_stops_after_the_deepest_module(model):
    tokenizer = make_tokenizer()
    inputs = tokenizer([refusal_pairs(1)[0]["positive"]], return_tensors="pt")
    blocks = find_decoder_blocks(model).modules
    ran = []
    handle = blocks[LAYER + 1].register_forward_hook(lambda *a: ran.append(True))
    try:
        extract_activations(model, inputs, [0, LAYER], "mlp")
    finally:
        handle.remove()
    assert not ran, "blocks after the deepest hooked one ran"
    assert hook_count(model) == 0


def test_activation_hook_is_the_reference_context_manager(model):
    tokenizer = make_tokenizer()
    inputs = tokenizer([refusal_pairs(1)[0]["positive"]], return_tensors="pt")
    hook = ActivationHook(model, [0, LAYER], component="attn", token_position="all")
    with hook:
        assert hook.is_attached
        with torch.no_grad():
            model(**inputs)
    assert not hook.is_attached and hook_count(model) == 0
    assert sorted(hook.cache.keys()) == ["layer_0", f"layer_{LAYER}"] and "layer_0" in hook.cache
    acts = hook.get_activations()
    want = block_outputs(model, inputs["input_ids"][0].tolist(), [LAYER], "attn")[LAYER]
    torch.testing.assert_close(acts[LAYER][0], want)
    hook.cache.clear()
    assert len(hook.cache) == 0 and hook.get_activations() == {}


def test_hooks_come_off_when_the_forward_fails(model):
    hook = ActivationHook(model, [LAYER], component="mlp")
    with pytest.raises(RuntimeError), hook:
        raise RuntimeError("boom")
    assert hook_count(model) == 0
    with pytest.raises(TypeError, match="inputs must be a dict"):
        extract_activations(model, torch.tensor([[1, 2]]), [LAYER])


def test_cache_stores_detached_copies():
    cache = ActivationCache()
    source = torch.ones(2, 3, requires_grad=True)
    cache.store("x", source)
    with torch.no_grad():
        source.mul_(2)
    assert not cache.get("x").requires_grad and cache.get("x").eq(1).all()
    assert cache.get("missing") is None


def test_reference_import_paths():
    from rotalabs_steer.core import ActivationHook as core_hook, SteeringVector, infer_model_config  # noqa: F401
    from rotalabs_steer.core.hooks import extract_activations as core_extract
    from rotalabs_steer.core.injection import ActivationInjector  # noqa: F401
    from rotalabs_steer.core.vectors import SteeringVectorSet  # noqa: F401
    from rotalabs_steer.core.configs import MODEL_CONFIGS  # noqa: F401

    assert core_hook is ActivationHook and core_extract is extract_activations


@pytest.fixture(scope="module", params=sorted(__import__("arch_zoo").ARCHITECTURES))
def zoo_model(request):
    from arch_zoo import ARCHITECTURES

    return request.param, ARCHITECTURES[request.param]()


def test_components_of_every_architecture_match_float64_truth(zoo_model):
    """mlp and attn outputs on every layout (OPT's MLP runs on flattened [batch * seq] rows)."""
    name, model = zoo_model
    tokenizer = make_tokenizer(padding_side="left")
    for component in ("mlp", "attn"):
        want = caa_truth(model, tokenizer, refusal_pairs(4), [2], "mean", component=component)[2]
        got = extract_caa_vector(model, tokenizer, refusal_pairs(4), 2, "mean", show_progress=False, batch_size=3,
                                 component=component)
        assert relative_error(got.vector, want) <= TOLERANCE, f"{name} {component}"
        # Right-padded: left padding would shift GPT-2/OPT-style absolute positions in the user's own forward.
        inputs = make_tokenizer()([p["positive"] for p in refusal_pairs(3)], return_tensors="pt", padding=True)
        last = extract_activations(model, inputs, [2], component, "last")[2]
        for i, text in enumerate(p["positive"] for p in refusal_pairs(3)):
            truth = block_outputs(model, tokenizer(text)["input_ids"], [2], component)[2][-1]
            torch.testing.assert_close(last[i, 0], truth, rtol=1e-4, atol=1e-5, msg=f"{name} {component}")
    assert hook_count(model) == 0
