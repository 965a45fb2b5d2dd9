"""Steering at inference: positions under generate with a KV cache, operators, clean exit."""

from __future__ import annotations

import pytest
import torch

from rotalabs_steer import SteeringVector, SteeringVectorSet
from rotalabs_steer.steering import ActivationInjector, MultiVectorInjector
from tiny_models import HIDDEN, NUM_LAYERS, hook_count, make_model, make_tokenizer

LAYER = 1
STEPS = 6



def random_vector(layer=LAYER, scale=4.0, seed=1, behavior="refusal") -> SteeringVector:
    torch.manual_seed(seed)
    return SteeringVector(behavior, layer, torch.randn(HIDDEN) * scale, "tiny")


@pytest.fixture(scope="module")
def llama():
    return make_model("llama"), make_tokenizer()


def prompt_ids(tokenizer, text="User: tell me a story\nAssistant:"):
    return tokenizer(text)["input_ids"]


def manual_greedy(model, ids, vector, strength, steer_prompt, steer_generated):
    """Reference: no cache, full recompute each step, vector added where the mask says."""
    ids, prompt_len, scores = list(ids), len(ids), []
    for _ in range(STEPS):
        mask = torch.zeros(len(ids), dtype=torch.bool)
        mask[:prompt_len] = steer_prompt
        mask[prompt_len:] = steer_generated

        def add(module, args, output, mask=mask):
            return output + strength * vector * mask[None, :, None].to(output.dtype)

        handle = model.model.layers[LAYER].register_forward_hook(add)
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, -1]
        handle.remove()
        scores.append(logits)
        ids.append(int(logits.argmax()))
    return ids[prompt_len:], torch.stack(scores)


def generate(model, ids, **kwargs):
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor([ids]), max_new_tokens=STEPS, do_sample=False,
                             output_scores=True, return_dict_in_generate=True, pad_token_id=0, **kwargs)
    return out.sequences[0, len(ids):].tolist(), torch.cat(out.scores)


@pytest.mark.parametrize("apply_to,steer_prompt,steer_generated", [
    ("both", True, True), ("prompt", True, False), ("generated", False, True),
])
def test_generate_matches_hand_computed_reference(llama, apply_to, steer_prompt, steer_generated):
    model, tokenizer = llama
    ids, vector = prompt_ids(tokenizer), random_vector()
    plain_tokens, _ = generate(model, ids)
    with ActivationInjector(model, [vector], strength=1.5, apply_to=apply_to):
        tokens, scores = generate(model, ids)
    want_tokens, want_scores = manual_greedy(model, ids, vector.vector, 1.5, steer_prompt, steer_generated)
    assert tokens == want_tokens
    torch.testing.assert_close(scores, want_scores, rtol=1e-4, atol=1e-4)
    assert tokens != plain_tokens or apply_to == "generated"  # the vector really acts
    assert hook_count(model) == 0


@pytest.mark.parametrize("mode", ["all", "last", "first"])
def test_left_padded_rows_equal_their_unpadded_runs(llama, mode):
    model, _ = llama
    tokenizer = make_tokenizer(padding_side="left")
    texts = ["User: hi\nAssistant:", "User: please write a long and careful answer about rivers\nAssistant:"]
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    vector = random_vector()
    with ActivationInjector(model, [vector], strength=2.0, injection_mode=mode):
        with torch.no_grad():
            together = model.generate(**batch, max_new_tokens=STEPS, do_sample=False, pad_token_id=0)
        alone = [generate(model, prompt_ids(tokenizer, t))[0] for t in texts]
    width = batch["input_ids"].shape[1]
    assert [row[width:].tolist() for row in together] == alone


def block_output(model, **inputs) -> torch.Tensor:
    """Output of block LAYER as the next module sees it (after any steering hook)."""
    seen = {}
    handle = model.model.layers[LAYER].register_forward_hook(lambda m, a, o: seen.__setitem__("h", o.clone()))
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        handle.remove()
    return seen["h"]


def test_position_masks_in_one_forward(llama):
    """Within a plain forward, 'first'/'last' touch one real token per row, 'all' every real one."""
    model, _ = llama
    inputs = {"input_ids": torch.tensor([[0, 0, 5, 6, 7], [5, 6, 7, 8, 9]]),
              "attention_mask": torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])}
    plain = block_output(model, **inputs)
    vector = random_vector()
    expected = {"all": inputs["attention_mask"].bool(),
                "first": torch.tensor([[0, 0, 1, 0, 0], [1, 0, 0, 0, 0]]).bool(),
                "last": torch.tensor([[0, 0, 0, 0, 1], [0, 0, 0, 0, 1]]).bool()}
    for mode, where in expected.items():
        with ActivationInjector(model, [vector], strength=1.0, injection_mode=mode):
            steered = block_output(model, **inputs)
        changed = (steered - plain).abs().amax(-1) > 0
        assert torch.equal(changed, where), mode
        torch.testing.assert_close(steered[where], plain[where] + vector.vector)


def test_strength_zero_is_bit_identical_and_strength_is_mutable(llama):
    model, tokenizer = llama
    ids = torch.tensor([prompt_ids(tokenizer)])
    with torch.no_grad():
        plain = model(input_ids=ids).logits
        injector = ActivationInjector(model, [random_vector()], strength=0.0)
        with injector:
            assert torch.equal(model(input_ids=ids).logits, plain)
            injector.strength = 3.0
            assert not torch.allclose(model(input_ids=ids).logits, plain)
        assert torch.equal(model(input_ids=ids).logits, plain)
    assert hook_count(model) == 0


def test_ablate_removes_the_direction_and_keep_norm_keeps_norms(llama):
    model, tokenizer = llama
    ids = torch.tensor([prompt_ids(tokenizer)])
    vector = random_vector()
    unit = vector.vector / vector.vector.norm()
    plain = block_output(model, input_ids=ids)
    with ActivationInjector(model, [vector], operator="ablate"):
        ablated = block_output(model, input_ids=ids)
    assert (plain @ unit).abs().max() > 1e-2
    assert (ablated @ unit).abs().max() < 1e-4
    with ActivationInjector(model, [vector], strength=2.0, keep_norm=True):
        kept = block_output(model, input_ids=ids)
    torch.testing.assert_close(kept.norm(dim=-1), plain.norm(dim=-1))
    assert not torch.allclose(kept, plain)


def test_hooks_removed_after_error_inside_context(llama):
    model, tokenizer = llama
    with pytest.raises(RuntimeError, match="user error"):
        with ActivationInjector(model, [random_vector()]):
            raise RuntimeError("user error")
    assert hook_count(model) == 0
    injector = ActivationInjector(model, [random_vector()]).attach()
    assert injector.attach() is injector and injector.is_attached
    injector.detach()
    injector.detach()
    assert hook_count(model) == 0


def two_behaviours(llama):
    """The model, prompt ids, vectors "a" and "b" at LAYER, and one set for each."""
    model, tokenizer = llama
    a, b = random_vector(seed=1, behavior="a"), random_vector(seed=2, behavior="b")
    sets = {"a": SteeringVectorSet("a", [a]), "b": SteeringVectorSet("b", [b])}
    return model, torch.tensor([prompt_ids(tokenizer)]), (a, b), sets


def test_multi_vector_injector(llama):
    model, ids, (a, b), sets = two_behaviours(llama)
    with torch.no_grad():
        with ActivationInjector(model, [SteeringVector("x", LAYER, a.vector * 0.5 + b.vector * 2.0, "tiny")]):
            want = model(input_ids=ids).logits
        multi = MultiVectorInjector(model, sets, {"a": 0.5, "b": 2.0}, default_layer=LAYER)
        with multi:
            got = model(input_ids=ids).logits
            multi.set_strength("a", 0.0)
            multi.set_strength("b", 0.0)
            assert multi.get_strength("b") == 0.0
            assert torch.equal(model(input_ids=ids).logits, model.__class__.forward(model, input_ids=ids).logits)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(KeyError):
        multi.set_strength("nope", 1.0)
    assert hook_count(model) == 0


def test_multi_vector_partial_strengths(llama):
    """As in the reference: behaviours a strengths dict leaves out get 0.0; unknown names are kept."""
    model, ids, (a, b), sets = two_behaviours(llama)
    with torch.no_grad():
        with ActivationInjector(model, [a], strength=0.5):
            want = model(input_ids=ids).logits
        multi = MultiVectorInjector(model, sets, {"a": 0.5, "ghost": 3.0}, default_layer=LAYER)
        assert (multi.get_strength("a"), multi.get_strength("b"), multi.get_strength("ghost")) == (0.5, 0.0, 3.0)
        with multi:
            got = model(input_ids=ids).logits
        multi.set_strength("b", 1.0)  # left out, but still a behaviour it knows
        multi.set_strength("ghost", 0.0)
        assert multi.get_strength("b") == 1.0
        # an empty dict means "no strengths given": every set at 1.0, as in the reference
        assert MultiVectorInjector(model, sets, {}).get_strength("b") == 1.0
    assert torch.equal(got, want)
    assert hook_count(model) == 0


def test_reference_attached_flags(llama):
    """The reference's test suite reads ``_attached`` and ``len(_handles)`` on all three classes."""
    from rotalabs_steer import ActivationHook
    model, _ = llama
    vector = random_vector()
    hook = ActivationHook(model, layer_indices=[0, 1])
    injector = ActivationInjector(model, [vector])
    multi = MultiVectorInjector(model, {"refusal": SteeringVectorSet("refusal", [vector])})
    for thing, hooks in ((hook, 2), (injector, 1), (multi, 1)):
        assert (thing._attached, len(thing._handles)) == (False, 0)
        thing.attach()
        assert (thing._attached, thing.is_attached, len(thing._handles)) == (True, True, hooks)
        thing.detach()
        assert (thing._attached, len(thing._handles)) == (False, 0)
        with thing:
            assert thing._attached
        assert not thing._attached
    assert hook_count(model) == 0


@pytest.mark.parametrize("make,error,fragment", [
    (lambda: [SteeringVector("r", LAYER, torch.randn(HIDDEN + 1), "m")], ValueError, "hidden size"),
    (lambda: [SteeringVector("r", NUM_LAYERS, torch.randn(HIDDEN), "m")], IndexError, "out of range"),
    (lambda: [SteeringVector("r", 1, torch.full((HIDDEN,), float("nan")), "m")], ValueError, "NaN"),
    (lambda: [], ValueError, "empty"),
    (lambda: ["not a vector"], TypeError, "SteeringVector"),
    (lambda: [random_vector(1), random_vector(1 - NUM_LAYERS)], ValueError, "two vectors"),
])
def test_bad_vectors(llama, make, error, fragment):
    model, _ = llama
    with pytest.raises(error, match=fragment):
        ActivationInjector(model, make())
    assert hook_count(model) == 0


def test_bad_options(llama):
    model, _ = llama
    for kwargs, fragment in [({"strength": float("nan")}, "strength"), ({"injection_mode": "middle"}, "injection_mode"),
                             ({"apply_to": "sometimes"}, "apply_to"), ({"operator": "multiply"}, "operator")]:
        with pytest.raises((TypeError, ValueError), match=fragment):
            ActivationInjector(model, [random_vector()], **kwargs)
