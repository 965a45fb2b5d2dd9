"""Breadth: discovery, extraction, steering and config inference on every architecture in the zoo.

Each tiny model is built once (module-scoped fixture); its float64 ground truth too.
"""

from __future__ import annotations

import copy

import pytest
import torch

from arch_zoo import ARCHITECTURES, BLOCK_PATHS, COMPONENT_NAMES
from ground_truth import block_outputs, relative_error, select
from rotalabs_steer import SteeringVector, infer_model_config
from rotalabs_steer.extraction import extract_caa_vectors
from rotalabs_steer.layers import component_module, find_decoder_blocks
from rotalabs_steer.steering import ActivationInjector
from tiny_models import HIDDEN, NUM_LAYERS, make_tokenizer, refusal_pairs

MIDDLE, LAST = NUM_LAYERS // 2, NUM_LAYERS - 1
LAYERS = [MIDDLE, LAST]  # a middle block and the last one (whose output is pre-final-norm)
TOLERANCE = 1e-5
STRENGTH = 3.0
NEW_TOKENS = 4
# Three lengths, so a left-padded batch has pad positions in two rows.
STEER_TEXTS = ["User: how do I bake bread?\nAssistant: Mix flour, water and yeast, then knead it well.",
               "User: hi\nAssistant: Hello!",
               "User: tell me a story about a dragon\nAssistant: Once upon a time"]



@pytest.fixture(scope="module", params=list(ARCHITECTURES))
def arch(request):
    return request.param, ARCHITECTURES[request.param]()


@pytest.fixture(scope="module")
def truth(arch):
    """{token_position: {layer: float64 vector}} from unbatched forwards of a float64 copy."""
    _, model = arch
    model64 = copy.deepcopy(model).to(torch.float64)
    tokenizer = make_tokenizer()
    sums = {position: {layer: [0.0, 0.0] for layer in LAYERS} for position in ("last", "mean")}
    chosen = refusal_pairs()
    for side, key in enumerate(("positive", "negative")):
        for pair in chosen:
            outputs = block_outputs(model64, tokenizer(pair[key])["input_ids"], LAYERS)
            for position, by_layer in sums.items():
                for layer in LAYERS:
                    by_layer[layer][side] = by_layer[layer][side] + select(outputs[layer], position)
    return {position: {layer: (s[0] - s[1]) / len(chosen) for layer, s in by_layer.items()}
            for position, by_layer in sums.items()}


def hooks_on(model) -> list[tuple[str, str, object]]:
    return [(name, kind, key) for name, module in model.named_modules()
            for kind in ("_forward_hooks", "_forward_pre_hooks") for key in getattr(module, kind)]


def text_config(model):
    return model.config.get_text_config()


def test_discovery(arch):
    name, model = arch
    blocks = find_decoder_blocks(model)
    assert blocks.path == BLOCK_PATHS[name]
    assert len(blocks) == text_config(model).num_hidden_layers == NUM_LAYERS
    assert blocks.modules == tuple(model.get_submodule(BLOCK_PATHS[name]))
    if name == "llava":  # the language model's blocks, not the vision tower's
        vision = set(map(id, model.get_submodule("model.vision_tower").modules()))
        assert not any(id(block) in vision for block in blocks.modules)


@pytest.mark.parametrize("token_position,padding_side", [("last", "left"), ("mean", "right")])
def test_extraction_matches_float64_truth(arch, truth, token_position, padding_side):
    name, model = arch
    tokenizer = make_tokenizer(padding_side=padding_side)
    vectors = extract_caa_vectors(model, tokenizer, refusal_pairs(), LAYERS, token_position, show_progress=False,
                                  batch_size=3)
    for layer in LAYERS:
        error = relative_error(vectors[layer].vector, truth[token_position][layer])
        assert error <= TOLERANCE, f"{name} layer {layer} {token_position}: relative error {error:.2e}"
    assert tokenizer.padding_side == padding_side
    assert hooks_on(model) == []


def _run(model, batch, blocks) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Logits and every block's output; the recording hooks go on last, so they see steered outputs."""
    outputs: list[torch.Tensor | None] = [None] * len(blocks)

    def keep(layer):
        def hook(module, args, output):
            outputs[layer] = (output[0] if isinstance(output, tuple) else output).detach().clone()
        return hook

    handles = [block.register_forward_hook(keep(layer)) for layer, block in enumerate(blocks)]
    try:
        with torch.no_grad():
            logits = model(**batch, use_cache=False).logits
    finally:
        for handle in handles:
            handle.remove()
    return outputs, logits


def test_steering_acts_only_where_it_should(arch):
    name, model = arch
    before = hooks_on(model)
    blocks = find_decoder_blocks(model).modules
    batch = dict(make_tokenizer(padding_side="left")(STEER_TEXTS, return_tensors="pt", padding=True))
    real = batch["attention_mask"].bool()
    assert not real.all()  # there is left padding
    torch.manual_seed(1)
    vector = SteeringVector("refusal", MIDDLE, torch.randn(HIDDEN), "tiny")

    plain, plain_logits = _run(model, batch, blocks)
    with ActivationInjector(model, [vector], strength=STRENGTH, injection_mode="all", apply_to="both"):
        steered, steered_logits = _run(model, batch, blocks)
    after_logits = _run(model, batch, blocks)[1]

    for layer in range(MIDDLE):
        assert torch.equal(steered[layer], plain[layer]), f"{name}: block {layer} changed"
    want = plain[MIDDLE] + STRENGTH * vector.vector.to(plain[MIDDLE].dtype)
    torch.testing.assert_close(steered[MIDDLE][real], want[real], rtol=TOLERANCE, atol=TOLERANCE)
    assert torch.equal(steered[MIDDLE][~real], plain[MIDDLE][~real]), f"{name}: pad positions were steered"
    assert (steered_logits - plain_logits)[real].abs().max() > 1e-3, f"{name}: steering did not change logits"
    assert torch.equal(after_logits, plain_logits), f"{name}: logits differ after the injector exited"
    assert hooks_on(model) == before == []  # a fresh model: nothing ran output_hidden_states on it


def test_output_hidden_states_show_steering(arch):
    """hidden_states[L + 1] is block L's steered output, as the next block sees it.

    transformers 5 records hidden states with forward hooks it puts on the blocks, for good,
    at the first forward with output_hidden_states=True; the steering hook must run before them.
    """
    name, model = arch
    model = copy.deepcopy(model)  # the recording hooks stay: keep them off the shared model
    ids = torch.tensor([make_tokenizer()(STEER_TEXTS[0])["input_ids"]])
    with torch.no_grad():
        plain = model(input_ids=ids, output_hidden_states=True).hidden_states
    before = hooks_on(model)  # transformers' recorders (none for the older Falcon / BLOOM code)
    torch.manual_seed(3)
    vector = SteeringVector("refusal", MIDDLE, torch.randn(HIDDEN), "tiny")
    with ActivationInjector(model, [vector], strength=STRENGTH), torch.no_grad():
        steered = model(input_ids=ids, output_hidden_states=True).hidden_states
    for index in range(MIDDLE + 1):
        assert torch.equal(steered[index], plain[index]), f"{name}: hidden_states[{index}] changed"
    torch.testing.assert_close(steered[MIDDLE + 1], plain[MIDDLE + 1] + STRENGTH * vector.vector,
                               rtol=TOLERANCE, atol=TOLERANCE)
    assert hooks_on(model) == before


def test_steered_generate_matches_uncached_reference(arch):
    """With a KV cache under generate, apply_to="prompt" steers the prompt and nothing generated.

    Raw logits (output_logits), so min_new_tokens' EOS masking does not enter the comparison.
    """
    name, model = arch
    blocks = find_decoder_blocks(model).modules
    prompt = make_tokenizer()("User: tell me a story\nAssistant:")["input_ids"]
    torch.manual_seed(2)
    vector = SteeringVector("refusal", MIDDLE, torch.randn(HIDDEN), "tiny")
    with ActivationInjector(model, [vector], strength=STRENGTH, apply_to="prompt"), torch.no_grad():
        out = model.generate(input_ids=torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                             output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    ids = out.sequences[0].tolist()
    assert len(ids) == len(prompt) + NEW_TOKENS
    assert hooks_on(model) == []

    def add_to_prompt(module, args, output):  # the reference: no cache, prompt positions only
        hidden = output[0] if isinstance(output, tuple) else output
        mask = (torch.arange(hidden.shape[1]) < len(prompt)).to(hidden.dtype)
        hidden = hidden + STRENGTH * vector.vector * mask[None, :, None]
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    for step in range(NEW_TOKENS):
        handle = blocks[MIDDLE].register_forward_hook(add_to_prompt)
        try:
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([ids[:len(prompt) + step]]), use_cache=False).logits[0, -1]
        finally:
            handle.remove()
        torch.testing.assert_close(out.logits[step][0], logits, rtol=1e-4, atol=1e-4,
                                   msg=lambda m: f"{name} step {step}: {m}")


def test_infer_model_config_templates_resolve(arch):
    name, model = arch
    config = infer_model_config(model)
    assert (config.num_layers, config.hidden_size) == (NUM_LAYERS, HIDDEN)
    path = BLOCK_PATHS[name]
    mlp, attn = COMPONENT_NAMES[name]
    assert config.layer_template == config.residual_template == f"{path}.{{i}}"
    assert config.mlp_template == f"{path}.{{i}}.{mlp}"
    assert config.attn_template == f"{path}.{{i}}.{attn}"
    blocks = find_decoder_blocks(model).modules
    for k, block in enumerate(blocks):
        assert model.get_submodule(config.layer_template.format(i=k)) is block
        assert model.get_submodule(config.residual_template.format(i=k)) is block
        mlp_module = model.get_submodule(config.mlp_template.format(i=k))
        attn_module = model.get_submodule(config.attn_template.format(i=k))
        assert mlp_module is component_module(block, "mlp")[0] is getattr(block, mlp)
        assert attn_module is component_module(block, "attn")[0] is getattr(block, attn)
        assert "attention" in type(attn_module).__name__.lower()
        kind = type(mlp_module).__name__.lower()
        assert "mlp" in kind or "moe" in kind or (name == "opt" and isinstance(mlp_module, torch.nn.Linear))
