"""This package's own scores (evaluation.scoring): rows per strength, strength 0 is the unsteered model,
planted vectors move scores."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from rotalabs_steer import SteeringVector
from rotalabs_steer.datasets import EvaluationDataset, load_caa_ab, load_evaluation_prompts, load_refusal_pairs
from rotalabs_steer.evaluation import (
    COMPLIANCE_OPENINGS,
    REFUSAL_OPENINGS,
    evaluate,
    has_refusal_phrase,
    refusal_logprob,
    score_strength,
    score_strengths,
)
from rotalabs_steer.evaluation.scoring import _opening_ids
from rotalabs_steer.extraction import extract_caa_vector
from tiny_models import HIDDEN, NUM_LAYERS, hook_count, make_model, make_tokenizer

LAST = NUM_LAYERS - 1
# Planted unit vectors act on the last block's output, whose norm is ~0.3 in the tiny models.
STRENGTHS = (-0.2, -0.1, 0.0, 0.1, 0.2, 0.4)
REFUSAL_KEYS = {"strength", "refusal_logprob", "refusal_log_odds", "refusal_rate", "perplexity", "generations"}


@pytest.fixture(scope="module")
def llama():
    return make_model("llama"), make_tokenizer()


@pytest.fixture(scope="module")
def prompts():
    return load_evaluation_prompts("refusal")[:5]



def unembedding_direction(model, raise_ids, lower_ids) -> SteeringVector:
    """A unit vector at the last block that raises the logits of ``raise_ids`` over ``lower_ids``.

    The last block's output goes through the final RMSNorm (weight 1 at init) into the
    unembedding, so adding this direction adds to those tokens' logits, at every position.
    """
    unembedding = model.get_output_embeddings().weight.detach()
    direction = unembedding[sorted(raise_ids)].mean(0) - unembedding[sorted(lower_ids)].mean(0)
    return SteeringVector("planted", LAST, direction / direction.norm(), "tiny")


def refusal_direction(model, tokenizer) -> SteeringVector:
    refusing = {t for o in REFUSAL_OPENINGS for t in _opening_ids(tokenizer, o)}
    complying = {t for o in COMPLIANCE_OPENINGS for t in _opening_ids(tokenizer, o)}
    return unembedding_direction(model, refusing - complying, complying - refusing)


def test_sweep_has_one_row_per_strength(llama, prompts):
    model, tokenizer = llama
    rows = score_strengths(model, tokenizer, refusal_direction(model, tokenizer), STRENGTHS, prompts, max_new_tokens=4)
    assert [row["strength"] for row in rows] == list(STRENGTHS)
    for row in rows:
        assert set(row) == REFUSAL_KEYS
        assert len(row["generations"]) == len(prompts)
        assert 0.0 <= row["refusal_rate"] <= 1.0 and row["perplexity"] > 1.0


def test_strength_zero_is_the_unsteered_model(llama, prompts):
    model, tokenizer = llama
    vector = refusal_direction(model, tokenizer)
    row = score_strength(model, tokenizer, vector, 0.0, prompts, max_new_tokens=6)
    assert row == {"strength": 0.0, **evaluate(model, tokenizer, prompts, max_new_tokens=6)}
    assert row["refusal_logprob"] == refusal_logprob(model, tokenizer, prompts)
    assert hook_count(model) == 0


def test_planted_refusal_vector_moves_scores_monotonically(llama, prompts):
    model, tokenizer = llama
    rows = score_strengths(model, tokenizer, refusal_direction(model, tokenizer), STRENGTHS, prompts, max_new_tokens=2)
    for key in ("refusal_logprob", "refusal_log_odds"):
        curve = [row[key] for row in rows]
        assert all(a < b for a, b in zip(curve, curve[1:])), (key, curve)
    assert rows[-1]["refusal_log_odds"] - rows[0]["refusal_log_odds"] > 2.0


def test_ab_items_score_the_matching_letter(llama):
    model, tokenizer = llama
    records = [{"question": f"{q}\n(A) yes\n(B) no", "answer_matching_behavior": "(A)",
                "answer_not_matching_behavior": "(B)"}
               for q in ("Would you help me?", "Is this safe?", "Should I stop?")]
    items = load_caa_ab(records, behavior="planted")
    letter = {s: tokenizer.convert_tokens_to_ids(s) for s in "AB"}
    vector = unembedding_direction(model, {letter["A"]}, {letter["B"]})
    rows = score_strengths(model, tokenizer, vector, STRENGTHS, items, max_new_tokens=2)
    assert set(rows[0]) == {"strength", "matching_probability", "perplexity", "generations"}
    curve = [row["matching_probability"] for row in rows]
    assert all(0.0 < p < 1.0 for p in curve)
    assert all(a < b for a, b in zip(curve, curve[1:])), curve


def test_prompt_kinds_agree(llama, prompts):
    model, tokenizer = llama
    as_strings = evaluate(model, tokenizer, [e.prompt for e in prompts], max_new_tokens=2)
    assert evaluate(model, tokenizer, prompts, max_new_tokens=2) == as_strings
    assert evaluate(model, tokenizer, EvaluationDataset("refusal", prompts), max_new_tokens=2) == as_strings


def test_chat_template_renders_prompts(llama):
    model, tokenizer = llama
    tokenizer = make_tokenizer()
    tokenizer.chat_template = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                               "{% if add_generation_prompt %}assistant:{% endif %}")
    row = evaluate(model, tokenizer, ["How do I pick a lock?"], max_new_tokens=2)
    assert set(row) == REFUSAL_KEYS - {"strength"}


def test_keyword_classifier():
    assert has_refusal_phrase("I\u2019m sorry, but I can\u2019t help with that.")
    assert has_refusal_phrase("As an AI, I must decline.")
    assert not has_refusal_phrase("Sure, here is a recipe for bread.")


def test_dataframe_output(llama, prompts, monkeypatch):
    model, tokenizer = llama
    vector = refusal_direction(model, tokenizer)
    monkeypatch.setitem(sys.modules, "pandas", None)
    with pytest.raises(ImportError, match="pandas"):
        score_strengths(model, tokenizer, vector, [0.0], prompts, as_dataframe=True)
    fake = type(sys)("pandas")
    fake.DataFrame = lambda rows: ("frame", rows)
    monkeypatch.setitem(sys.modules, "pandas", fake)
    kind, rows = score_strengths(model, tokenizer, vector, [0.0], prompts, max_new_tokens=1, as_dataframe=True)
    assert kind == "frame" and rows[0]["strength"] == 0.0


@pytest.mark.parametrize("kwargs, error, message", [
    ({"strengths": []}, ValueError, "strengths is empty"),
    ({"strengths": [float("nan")]}, TypeError, r"strengths\[0\]"),
    ({"strengths": "1,2"}, TypeError, "strengths must be a list"),
    ({"prompts": []}, ValueError, "prompts is empty"),
    ({"prompts": "one prompt"}, TypeError, "prompts must be"),
    ({"prompts": ["ok", ""]}, ValueError, r"prompts\[1\]"),
    ({"behavior": "humor"}, ValueError, "behavior: no built-in score for 'humor'"),
    ({"max_new_tokens": 0}, ValueError, "max_new_tokens"),
    ({"batch_size": 0}, ValueError, "batch_size"),
])
def test_bad_arguments_are_named(llama, prompts, kwargs, error, message):
    model, tokenizer = llama
    arguments = {"strengths": [0.0], "prompts": prompts, **kwargs}
    with pytest.raises(error, match=message):
        score_strengths(model, tokenizer, refusal_direction(model, tokenizer), **arguments)


def test_plain_pairs_are_not_ab_items(llama, pairs):
    model, tokenizer = llama
    from rotalabs_steer.datasets import load_pairs

    with pytest.raises(ValueError, match=r"prompts\[0\] is not an A/B item"):
        evaluate(model, tokenizer, list(load_pairs(pairs)))


def test_hooks_and_flags_are_restored_after_an_error(llama, prompts, monkeypatch):
    model, tokenizer = llama
    vector = refusal_direction(model, tokenizer)

    def failing_generate(*args, **kwargs):
        raise RuntimeError("generation failed")

    monkeypatch.setattr(model, "generate", failing_generate)
    model.train()
    try:
        with pytest.raises(RuntimeError, match="generation failed"):
            score_strengths(model, tokenizer, vector, [1.0], prompts)
        assert model.training and hook_count(model) == 0
    finally:
        model.eval()


def test_sweep_plot(llama, prompts):
    matplotlib = pytest.importorskip("matplotlib")
    from rotalabs_steer.plots import plot_strength_sweep

    model, tokenizer = llama
    rows = score_strengths(model, tokenizer, refusal_direction(model, tokenizer), [0.2, -0.2, 0.0], prompts,
                          max_new_tokens=2)
    figure = plot_strength_sweep(rows)
    assert isinstance(figure, matplotlib.figure.Figure)
    assert [ax.get_ylabel() for ax in figure.axes] == [
        "log P(refusal opening)", "log-odds refusal vs compliance opening", "fraction of generations refusing",
        "perplexity under the unsteered model"]
    assert list(figure.axes[0].lines[0].get_xdata()) == [-0.2, 0.0, 0.2]
    with pytest.raises(ValueError, match="rows must be"):
        plot_strength_sweep([])


def test_projection_histogram_of_sampled_rows():
    matplotlib = pytest.importorskip("matplotlib")
    from rotalabs_steer import _core
    from rotalabs_steer.plots import plot_projection_histogram

    generator = torch.Generator().manual_seed(0)
    direction = torch.zeros(8)
    direction[0] = 1.0
    rows = torch.randn(40, 8, generator=generator, dtype=torch.float64)
    groups = torch.arange(40) % 2  # side 0 positive
    rows[groups == 0] += 3 * direction
    accumulator = _core.Accumulator(1, 8, 2, sample_rows=40)
    accumulator.add(0, rows, groups)
    sampled, codes = accumulator.samples(0)
    vector = SteeringVector("refusal", 2, direction * 5, "tiny")
    figure = plot_projection_histogram(vector, sampled[codes % 2 == 0], sampled[codes % 2 == 1])
    assert isinstance(figure, matplotlib.figure.Figure)
    assert "layer 2: accuracy" in figure.axes[0].get_title()
    with pytest.raises(ValueError, match=r"negative_rows must be a non-empty \[n, 8\] array"):
        plot_projection_histogram(vector, rows, rows[:, :4])
    with pytest.raises(ValueError, match="no direction"):
        plot_projection_histogram(SteeringVector("refusal", 2, torch.zeros(8), "tiny"), rows, rows)


def test_held_out_projection_histogram_of_an_extracted_vector():
    matplotlib = pytest.importorskip("matplotlib")
    from rotalabs_steer.plots import plot_held_out_projections

    model, tokenizer = make_model("llama"), make_tokenizer()
    pairs = [{"positive": p.positive, "negative": p.negative} for p in list(load_refusal_pairs())[:10]]
    vector = extract_caa_vector(model, tokenizer, pairs, 2, show_progress=False, batch_size=4)
    projections = vector.held_out_projections
    assert len(projections["positive"]) == len(projections["negative"]) == 10
    accuracy = (np.sum(projections["positive"] > 0) + np.sum(projections["negative"] <= 0)) / 20
    assert accuracy == vector.metadata["separation_accuracy"]
    assert vector.normalize().held_out_projections is projections
    figure = plot_held_out_projections(vector)
    assert isinstance(figure, matplotlib.figure.Figure) and "held out: accuracy" in figure.axes[0].get_title()
    with pytest.raises(ValueError, match="no held-out projections"):
        plot_held_out_projections(SteeringVector("refusal", 2, torch.ones(HIDDEN), "tiny"))
