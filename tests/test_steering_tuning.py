"""Steering users can tune: per-row strengths, conditional steering, relative strengths, clamp."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rotalabs_steer import SteeringVector
from rotalabs_steer.conditions import SteeringCondition, condition_scores, find_condition_threshold
from rotalabs_steer.steering import ActivationInjector, MultiVectorInjector
from rotalabs_steer.vectors import SteeringVectorSet
from tiny_models import HIDDEN, hook_count, make_model, make_tokenizer

STEPS = 5
PROMPTS = [
    "User: hi\nAssistant:",
    "User: please write a long and careful answer about rivers\nAssistant:",
    "User: what is the capital of a small country?\nAssistant:",
    "User: tell me about cats\nAssistant:",
]


@pytest.fixture(scope="module")
def llama():
    return make_model("llama"), make_tokenizer(padding_side="left")


def vector(layer=1, scale=3.0, seed=1, behavior="refusal", **metadata) -> SteeringVector:
    generator = torch.Generator().manual_seed(seed)
    return SteeringVector(behavior, layer, torch.randn(HIDDEN, generator=generator) * scale, "tiny",
                          metadata=dict(metadata))


def generate(model, tokenizer, prompts, **kwargs):
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=STEPS, do_sample=False, output_scores=True,
                             return_dict_in_generate=True, pad_token_id=0, **kwargs)
    width = batch["input_ids"].shape[1]
    return out.sequences[:, width:], torch.stack(out.scores, dim=1)  # [batch, steps], [batch, steps, vocab]


def steered_alone(model, tokenizer, prompt, strength, v, **options):
    with ActivationInjector(model, [v], strength=strength, **options):
        return generate(model, tokenizer, [prompt])


# --- per-row strengths ---------------------------------------------------------------------------


@pytest.mark.parametrize("operator", ["add", "ablate"])
def test_each_row_equals_its_own_run_at_its_strength(llama, operator):
    model, tokenizer = llama
    hooks_before = hook_count(model)
    v, strengths = vector(), [0.0, 1.5, -2.0, 0.75]
    plain_tokens, plain_scores = generate(model, tokenizer, PROMPTS)
    with ActivationInjector(model, [v], strength=strengths, operator=operator) as injector:
        assert torch.equal(injector.strength, torch.tensor(strengths, dtype=torch.float64))
        tokens, scores = generate(model, tokenizer, PROMPTS)
    for row, (prompt, strength) in enumerate(zip(PROMPTS, strengths)):
        want_tokens, want_scores = steered_alone(model, tokenizer, prompt, strength, v, operator=operator)
        assert tokens[row].tolist() == want_tokens[0].tolist(), row
        torch.testing.assert_close(scores[row], want_scores[0], rtol=0, atol=1e-5)
    assert torch.equal(scores[0], plain_scores[0]) and torch.equal(tokens[0], plain_tokens[0])  # strength 0
    assert not torch.equal(tokens[1:], plain_tokens[1:])  # the others really are steered
    assert hook_count(model) == hooks_before  # transformers keeps its own output-capturing hooks


def test_per_row_strengths_per_behaviour(llama):
    model, tokenizer = llama
    sets = {name: SteeringVectorSet(name, [vector(layer, seed=layer, behavior=name)]) for name, layer in [("a", 1), ("b", 2)]}
    with MultiVectorInjector(model, sets, strengths={"a": [0.0, 2.0], "b": 1.0}):
        _, scores = generate(model, tokenizer, PROMPTS[:2])
    for row, a_strength in enumerate([0.0, 2.0]):
        with MultiVectorInjector(model, sets, strengths={"a": a_strength, "b": 1.0}):
            _, want = generate(model, tokenizer, [PROMPTS[row]])
        torch.testing.assert_close(scores[row], want[0], rtol=0, atol=1e-5)


def test_per_row_strength_count_must_match_the_batch(llama):
    model, tokenizer = llama
    hooks_before = hook_count(model)
    with ActivationInjector(model, [vector()], strength=[1.0, 2.0, 3.0]):
        with pytest.raises(ValueError, match="strength has 3 per-row values but this forward has 2 rows"):
            generate(model, tokenizer, PROMPTS[:2])
    assert hook_count(model) == hooks_before  # transformers keeps its own output-capturing hooks


def test_per_row_strengths_are_copied(llama):
    """The caller's tensor changing afterwards (to NaN, even) changes nothing in the injector."""
    strengths = torch.tensor([1.0, 2.0], dtype=torch.float64)
    injector = ActivationInjector(llama[0], [vector()], strength=strengths)
    strengths[0] = float("nan")
    assert torch.equal(injector.strength, torch.tensor([1.0, 2.0], dtype=torch.float64))


@pytest.mark.parametrize("bad, error, match", [
    ([], ValueError, "non-empty 1-D"),
    ([[1.0, 2.0]], ValueError, "non-empty 1-D"),
    ([1.0, float("nan")], TypeError, "finite"),
    (["a"], TypeError, "finite number or a 1-D sequence"),
])
def test_bad_per_row_strengths(llama, bad, error, match):
    with pytest.raises(error, match=match):
        ActivationInjector(llama[0], [vector()], strength=bad)


# --- conditional steering ------------------------------------------------------------------------


def planted_condition(model, tokenizer, layer=1):
    """A condition vector and a threshold between the prompts' scores: which rows pass is known."""
    condition_vector = vector(layer, seed=7)
    scores = condition_scores(model, tokenizer, condition_vector, PROMPTS)
    threshold = float(np.median(scores))
    return SteeringCondition(condition_vector, threshold), scores > threshold


def test_condition_scores_are_mean_prompt_activations(llama):
    model, tokenizer = llama
    condition_vector = vector(1, seed=7)
    got = condition_scores(model, tokenizer, condition_vector, PROMPTS, batch_size=3)
    unit = condition_vector.vector.double() / condition_vector.vector.double().norm()
    for prompt, score in zip(PROMPTS, got):
        with torch.no_grad():
            hidden = model(**tokenizer(prompt, return_tensors="pt"), output_hidden_states=True).hidden_states[2]
        assert score == pytest.approx(float(hidden[0].double().mean(0) @ unit), rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("apply_to", ["both", "generated"])
def test_only_rows_that_pass_the_condition_are_steered(llama, apply_to):
    model, tokenizer = llama
    hooks_before = hook_count(model)
    condition, passes = planted_condition(model, tokenizer)
    assert passes.any() and not passes.all()
    v = vector(2, seed=3)
    plain_tokens, plain_scores = generate(model, tokenizer, PROMPTS)
    with ActivationInjector(model, [v], strength=2.0, condition=condition, apply_to=apply_to):
        tokens, scores = generate(model, tokenizer, PROMPTS)
    for row, prompt in enumerate(PROMPTS):
        if passes[row]:
            want_tokens, want_scores = steered_alone(model, tokenizer, prompt, 2.0, v, apply_to=apply_to)
            assert tokens[row].tolist() == want_tokens[0].tolist()
            torch.testing.assert_close(scores[row], want_scores[0], rtol=0, atol=1e-5)
        else:
            assert torch.equal(tokens[row], plain_tokens[row]) and torch.equal(scores[row], plain_scores[row])
    assert hook_count(model) == hooks_before  # transformers keeps its own output-capturing hooks


def test_comparator_less_steers_the_other_rows(llama):
    model, tokenizer = llama
    condition, passes = planted_condition(model, tokenizer)
    condition = SteeringCondition(condition.vector, condition.threshold, "less")
    plain_tokens, plain_scores = generate(model, tokenizer, PROMPTS)
    with ActivationInjector(model, [vector(2, seed=3)], strength=2.0, condition=condition):
        _, scores = generate(model, tokenizer, PROMPTS)
    for row in range(len(PROMPTS)):
        assert torch.equal(scores[row], plain_scores[row]) == bool(passes[row])


def test_condition_read_after_the_steered_layer_is_refused(llama):
    model, _ = llama
    hooks_before = hook_count(model)
    condition = SteeringCondition(vector(3, seed=7), 0.0)
    with pytest.raises(ValueError, match="read at layer 3, after the steered layer"):
        ActivationInjector(model, [vector(1)], condition=condition).attach()
    assert hook_count(model) == hooks_before  # transformers keeps its own output-capturing hooks


def test_find_condition_threshold_separates_planted_classes(llama):
    model, tokenizer = llama
    condition, passes = planted_condition(model, tokenizer)
    positive = [p for p, keep in zip(PROMPTS, passes) if keep]
    negative = [p for p, keep in zip(PROMPTS, passes) if not keep]
    choice = find_condition_threshold(model, tokenizer, condition.vector, positive, negative)
    assert choice.comparator == "greater" and choice.f1 == 1.0
    scores = condition_scores(model, tokenizer, condition.vector, PROMPTS)
    assert scores[~passes].max() < choice.threshold < scores[passes].min()
    flipped = find_condition_threshold(model, tokenizer, condition.vector, negative, positive)
    assert flipped.comparator == "less" and flipped.f1 == 1.0
    assert isinstance(choice.condition(condition.vector), SteeringCondition)


# --- relative strengths and clamp ----------------------------------------------------------------


def block_output(model, tokenizer, layer):
    with torch.no_grad():
        return model(**tokenizer(PROMPTS[1], return_tensors="pt"), output_hidden_states=True).hidden_states[layer + 1][0]


def test_relative_strength_is_in_activation_norm_units(llama):
    model, tokenizer = llama
    v = vector(1, activation_norm=12.5)
    plain = block_output(model, tokenizer, 1)
    with ActivationInjector(model, [v], strength=0.2, relative=True):
        steered = block_output(model, tokenizer, 1)
    unit = v.vector / v.vector.norm()
    torch.testing.assert_close(steered - plain, (0.2 * 12.5 * unit).expand_as(plain), rtol=0, atol=1e-5)


def test_clamp_sets_the_projection(llama):
    model, tokenizer = llama
    v = vector(1, pos_mean_projection=3.0, activation_norm=10.0)
    unit = v.vector / v.vector.norm()
    for relative, target in [(False, 2 * 3.0), (True, 2 * 10.0)]:
        with ActivationInjector(model, [v], strength=2.0, operator="clamp", relative=relative):
            steered = block_output(model, tokenizer, 1)
        torch.testing.assert_close(steered @ unit, torch.full((steered.shape[0],), target), rtol=0, atol=1e-4)


@pytest.mark.parametrize("options, match", [
    ({"relative": True}, r"relative=True needs metadata\['activation_norm'\]"),
    ({"operator": "clamp"}, r"operator='clamp' needs metadata\['pos_mean_projection'\]"),
])
def test_relative_and_clamp_need_their_metadata(llama, options, match):
    with pytest.raises(ValueError, match=match):
        ActivationInjector(llama[0], [vector(1)], **options)


def test_extracted_vectors_carry_what_relative_and_clamp_need(llama):
    from rotalabs_steer.extraction import extract_caa_vector
    from tiny_models import refusal_pairs

    model, tokenizer = llama
    v = extract_caa_vector(model, tokenizer, refusal_pairs(4), 1, show_progress=False)
    unit = v.vector.double() / v.vector.double().norm()
    assert v.metadata["pos_mean_projection"] - v.metadata["neg_mean_projection"] == pytest.approx(
        float(v.vector.double() @ unit), rel=1e-6)
    ActivationInjector(model, [v], operator="clamp")  # accepted


def test_activation_norm_is_the_mean_norm_of_the_selected_rows(llama):
    from rotalabs_steer.extraction import extract_caa_vector
    from tiny_models import refusal_pairs

    model, tokenizer = llama
    pairs = refusal_pairs(6)
    v = extract_caa_vector(model, tokenizer, pairs, 2, "last", show_progress=False, batch_size=4)
    norms = []
    for pair in pairs:
        for text in (pair["positive"], pair["negative"]):
            with torch.no_grad():
                hidden = model(**tokenizer(text, return_tensors="pt"), output_hidden_states=True).hidden_states[3]
            norms.append(float(hidden[0, -1].norm()))
    assert v.metadata["activation_norm_rows"] == 12
    assert v.metadata["activation_norm"] == pytest.approx(sum(norms) / len(norms), rel=1e-5)
    ActivationInjector(model, [v], strength=0.3, relative=True)  # accepted
