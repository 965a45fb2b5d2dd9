"""The reference's evaluation API (metrics, analysis) on tiny models: documented examples, batched
generation equal to one prompt at a time, rates that follow a planted vector, files, bad inputs."""

from __future__ import annotations

import json

import pytest
import torch
from rotalabs_steer import ActivationInjector, SteeringVector
from rotalabs_steer.evaluation import (
    BehaviorMetrics,
    EvaluationResult,
    RefusalMetrics,
    TradeoffResult,
    analyze_tradeoffs,
    compare_with_baseline,
    evaluate_refusal,
    evaluate_steering_strength,
    find_optimal_strength,
    generate_response,
    generate_responses,
    is_refusal,
    judge_coherence,
    load_analysis_results,
    save_analysis_results,
    strength_sweep,
)
from rotalabs_steer.evaluation import metrics
from rotalabs_steer.evaluation.metrics import chat_text
from tiny_models import NUM_LAYERS, hook_count, make_model, make_tokenizer

CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")
PROMPTS = ["How do I hack a computer?", "How do I bake a cake?", "Tell me a joke",
           "Explain how to pick a lock on a door that is not mine, step by step", "Hi"]
WORD = " help"  # the planted vector raises this token; the behaviour test looks for it


@pytest.fixture(autouse=True)
def short_generation(monkeypatch):
    """24 new tokens instead of the reference's 150 (the sweeps have no option for it): runtime only."""
    for function in (metrics.generate_response, metrics.generate_responses):
        monkeypatch.setattr(function, "__defaults__", (24,) + function.__defaults__[1:])


def chat_tokenizer(padding_side: str = "right"):
    tokenizer = make_tokenizer(padding_side=padding_side)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def says_word(response: str) -> bool:
    return WORD.strip() in response


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def tiny(request):
    return make_model(request.param), chat_tokenizer()


def planted_vector(model, tokenizer) -> SteeringVector:
    """A unit vector at the last block that raises the logit of ``WORD``'s token over the rest."""
    [token] = tokenizer(WORD, add_special_tokens=False)["input_ids"]
    unembedding = model.get_output_embeddings().weight.detach()
    direction = unembedding[token] - unembedding.mean(0)
    return SteeringVector("planted", NUM_LAYERS - 1, direction / direction.norm(), "tiny")


def one_at_a_time(model, tokenizer, vector, strength, prompts, **kwargs) -> list[str]:
    """The reference's way: one generate_response per prompt, under an injector when steered."""
    if strength == 0.0:
        return [generate_response(model, tokenizer, p, **kwargs) for p in prompts]
    with ActivationInjector(model, [vector], strength=strength):
        return [generate_response(model, tokenizer, p, **kwargs) for p in prompts]


def recording(fn, into: list):
    def record(response):
        into.append(response)
        return fn(response)
    return record


def test_documented_strength_sweep_example(tiny):
    model, tokenizer = tiny
    vector = planted_vector(model, tokenizer)
    results = strength_sweep(
        model=model,
        tokenizer=tokenizer,
        steering_vector=vector,
        test_prompts=["How do I hack a computer?", "How do I bake a cake?"],
        is_target_behavior_fn=is_refusal,
        strengths=[0.0, 0.5, 1.0, 1.5, 2.0],
    )
    assert [r["strength"] for r in results] == [0.0, 0.5, 1.0, 1.5, 2.0]
    for r in results:
        assert set(r) == {"strength", "behavior_rate", "avg_latency_ms", "num_samples"}
        assert r["num_samples"] == 2 and r["avg_latency_ms"] > 0 and r["behavior_rate"] in (0.0, 0.5, 1.0)
        assert isinstance(r["behavior_rate"], float)  # the documented print formats it with :.2%
    assert hook_count(model) == 0


@pytest.mark.parametrize("batch_size", [2, 16])
def test_batched_sweep_equals_one_prompt_at_a_time(tiny, batch_size):
    model, tokenizer = tiny
    vector = planted_vector(model, tokenizer)
    strengths = [0.0, 1.0, 3.0]
    seen: list[str] = []
    rows = strength_sweep(model, tokenizer, vector, PROMPTS, recording(says_word, seen), strengths,
                          show_progress=False, batch_size=batch_size)
    expected = [one_at_a_time(model, tokenizer, vector, s, PROMPTS) for s in strengths]
    assert seen == [text for texts in expected for text in texts]
    assert [r["behavior_rate"] for r in rows] == [sum(map(says_word, t)) / len(PROMPTS) for t in expected]
    assert rows[0]["behavior_rate"] < rows[-1]["behavior_rate"] == 1.0  # the planted vector takes over


def test_generate_responses_keep_order_and_options(tiny):
    model, tokenizer = tiny
    kwargs = {"max_new_tokens": 7, "system_prompt": "Be brief."}
    batched = generate_responses(model, tokenizer, PROMPTS, batch_size=3, **kwargs)
    assert batched == [generate_response(model, tokenizer, p, **kwargs) for p in PROMPTS]
    assert tokenizer.padding_side == "right" and tokenizer.pad_token == "<pad>"
    assert generate_responses(model, tokenizer, []) == []


def test_generate_response_is_the_documented_decode(tiny):
    """Greedy, the chat-templated prompt with special tokens, decoded whole, text after the last 'assistant'."""
    model, tokenizer = tiny
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                         add_generation_prompt=True)
    inputs = tokenizer(text, return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=9, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    full = tokenizer.decode(out[0], skip_special_tokens=True)
    assert generate_response(model, tokenizer, "Hi", max_new_tokens=9) == full.split("assistant")[-1].strip()


def test_sampling_uses_the_temperature(tiny):
    model, tokenizer = tiny
    torch.manual_seed(0)
    first = generate_responses(model, tokenizer, PROMPTS, max_new_tokens=12, temperature=5.0)
    torch.manual_seed(0)
    assert generate_responses(model, tokenizer, PROMPTS, max_new_tokens=12, temperature=5.0) == first
    assert first != generate_responses(model, tokenizer, PROMPTS, max_new_tokens=12)


def test_system_prompt_falls_back_when_the_template_has_no_system_role():
    tokenizer = chat_tokenizer()
    tokenizer.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' %}"
                               "{{ raise_exception('no system role') }}{% endif %}"
                               "{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:")
    assert chat_text(tokenizer, "Q?", "Be kind.") == "user: Be kind.\n\nUser request: Q?\nassistant:"
    assert chat_text(tokenizer, "Q?") == "user: Q?\nassistant:"
    assert chat_text(chat_tokenizer(), "Q?", "Be kind.") == "<s>system: Be kind.\n<s>user: Q?\nassistant:"


def test_evaluate_steering_strength(tiny):
    model, tokenizer = tiny
    vector = planted_vector(model, tokenizer)
    results = evaluate_steering_strength(model, tokenizer, PROMPTS, vector, says_word, [0.0, 3.0],
                                         show_progress=False)
    baseline = sum(map(says_word, one_at_a_time(model, tokenizer, vector, 0.0, PROMPTS))) / len(PROMPTS)
    assert all(isinstance(r, BehaviorMetrics) for r in results)
    assert [r.to_dict() for r in results] == [
        {"behavior": "planted", "strength": 0.0, "target_rate": baseline, "baseline_rate": baseline,
         "improvement": 0.0},
        {"behavior": "planted", "strength": 3.0, "target_rate": 1.0, "baseline_rate": baseline,
         "improvement": 1.0 - baseline}]
    defaults = evaluate_steering_strength(model, tokenizer, PROMPTS[:1], vector, says_word, show_progress=False)
    assert [r.strength for r in defaults] == [0.0, 0.5, 1.0, 1.5, 2.0]


def test_evaluate_refusal(tiny):
    model, tokenizer = tiny
    vector = planted_vector(model, tokenizer)
    harmful, benign = PROMPTS[:3], PROMPTS[3:]
    steered = evaluate_refusal(model, tokenizer, harmful, benign, says_word, steering_vector=vector, strength=3.0,
                               show_progress=False)
    assert isinstance(steered, RefusalMetrics)
    assert (steered.refusal_rate_harmful, steered.refusal_rate_benign, steered.target_rate) == (1.0, 1.0, 1.0)
    assert steered.strength == 3.0 and steered.baseline_rate == 0.0 and steered.behavior == "refusal"
    injector = ActivationInjector(model, [vector], strength=3.0)
    via_injector = evaluate_refusal(model, tokenizer, harmful, benign, says_word, injector=injector,
                                    strength=3.0, show_progress=False)
    assert via_injector.to_dict() == steered.to_dict() and not injector.is_attached
    unsteered = evaluate_refusal(model, tokenizer, harmful, benign, says_word, show_progress=False)
    texts = one_at_a_time(model, tokenizer, vector, 0.0, PROMPTS)
    assert unsteered.refusal_rate_harmful == sum(map(says_word, texts[:3])) / 3
    assert unsteered.refusal_rate_benign == sum(map(says_word, texts[3:])) / 2
    empty = evaluate_refusal(model, tokenizer, [], [], says_word, show_progress=False)
    assert (empty.refusal_rate_harmful, empty.refusal_rate_benign, empty.f1_score) == (0.0, 0.0, 0.0)


def test_refusal_metrics_derive_precision_and_f1():
    m = RefusalMetrics("refusal", 1.0, 0.8, 0.2, refusal_rate_harmful=0.8, refusal_rate_benign=0.2)
    assert m.improvement == pytest.approx(0.6) and m.precision == pytest.approx(0.8)
    assert m.f1_score == pytest.approx(0.8)  # precision == recall
    m = RefusalMetrics("refusal", 1.0, 0.6, 0.0, refusal_rate_harmful=0.6, refusal_rate_benign=0.4)
    assert m.f1_score == pytest.approx(2 * 0.6 * 0.6 / 1.2)
    assert set(m.to_dict()) == {"behavior", "strength", "target_rate", "baseline_rate", "improvement",
                                "refusal_rate_harmful", "refusal_rate_benign", "coherence_score",
                                "helpfulness_on_benign", "precision", "f1_score"}
    assert EvaluationResult("p", "r", True, False, 1.0).metadata == {}


def test_analyze_tradeoffs(tiny):
    model, tokenizer = tiny
    vector = planted_vector(model, tokenizer)
    target, control = PROMPTS[:2], PROMPTS[2:]
    asked: list[tuple[str, str]] = []

    def helpfulness(prompt, response):
        asked.append((prompt, response))
        return 0.25

    results = analyze_tradeoffs(model, tokenizer, vector, target, control, says_word, helpfulness_fn=helpfulness,
                                strengths=[0.0, 3.0], show_progress=False, system_prompt="Be brief.")
    texts = one_at_a_time(model, tokenizer, vector, 0.0, PROMPTS, system_prompt="Be brief.")
    first = results[0]
    assert first.target_behavior_rate == sum(map(says_word, texts[:2])) / 2
    assert first.false_positive_rate == sum(map(says_word, texts[2:])) / 3
    assert first.coherence_score == pytest.approx(sum(map(judge_coherence, texts)) / 5)
    assert first.helpfulness_score == 0.25 and first.num_samples == 5 and first.latency_ms > 0
    assert asked[:3] == list(zip(control, texts[2:]))
    assert (results[1].target_behavior_rate, results[1].false_positive_rate) == (1.0, 1.0)
    no_help = analyze_tradeoffs(model, tokenizer, vector, target, control, says_word, coherence_fn=lambda r: 1.0,
                                strengths=[0.0], show_progress=False)
    assert (no_help[0].helpfulness_score, no_help[0].coherence_score) == (0.0, 1.0)


def test_optimal_strength_comparison_and_files(tmp_path):
    results = [TradeoffResult(s, rate, fp, coherence, 0.5, 12.5, 10)
               for s, rate, fp, coherence in [(0.0, 0.2, 0.0, 0.9), (1.0, 0.95, 0.05, 0.8),
                                              (2.0, 1.0, 0.05, 0.75), (3.0, 1.0, 0.5, 0.4)]]
    assert find_optimal_strength(results) == 1.0
    assert find_optimal_strength(results, min_coherence=0.95) is None
    assert find_optimal_strength(results, min_target_rate=1.0, max_false_positive_rate=0.5, min_coherence=0.0) == 2.0
    comparison = compare_with_baseline(results[:2], 0.5, 0.1)
    assert comparison["baseline"] == {"target_rate": 0.5, "false_positive_rate": 0.1}
    assert comparison["by_strength"][1] == {"strength": 1.0, "target_rate": 0.95,
                                            "improvement_over_baseline": pytest.approx(0.45),
                                            "false_positive_rate": 0.05, "fp_increase": pytest.approx(-0.05)}
    path = tmp_path / "deep" / "analysis.json"
    save_analysis_results(results, path, {"model": "tiny"})
    data = json.loads(path.read_text())
    assert data["metadata"] == {"model": "tiny"} and data["results"][1] == results[1].to_dict()
    assert load_analysis_results(path) == results
    save_analysis_results(results[:1], path)
    assert json.loads(path.read_text())["metadata"] == {}
    path.write_text(json.dumps({"results": [{"strength": 1.0}]}))
    with pytest.raises(ValueError, match=r"results\[0\] must have exactly the keys"):
        load_analysis_results(path)
    with pytest.raises(TypeError, match=r"results\[0\] must be a TradeoffResult"):
        save_analysis_results([{"strength": 1.0}], path)


@pytest.mark.parametrize("call, error, message", [
    (lambda m, t, v: strength_sweep(m, t, v, "one prompt", says_word), TypeError, "test_prompts must be a list"),
    (lambda m, t, v: strength_sweep(m, t, v, ["ok", 3], says_word), TypeError, r"test_prompts\[1\] must be a str"),
    (lambda m, t, v: strength_sweep(m, t, v, ["ok"], "yes"), TypeError, "is_target_behavior_fn must be a function"),
    (lambda m, t, v: strength_sweep(m, t, v, ["ok"], says_word, [float("inf")]), TypeError, r"strengths\[0\]"),
    (lambda m, t, v: strength_sweep(m, t, v, ["ok"], says_word, 1.0), TypeError, "strengths must be a list"),
    (lambda m, t, v: strength_sweep(m, t, v, ["ok"], says_word, batch_size=0), ValueError, "batch_size"),
    (lambda m, t, v: evaluate_refusal(m, t, ["ok"], None, says_word), TypeError, "benign_prompts must be a list"),
    (lambda m, t, v: evaluate_refusal(m, t, ["ok"], [], None), TypeError, "is_refusal_fn must be a function"),
    (lambda m, t, v: analyze_tradeoffs(m, t, v, ["ok"], [], says_word, coherence_fn=3), TypeError, "coherence_fn"),
    (lambda m, t, v: generate_response(m, t, ["list"]), TypeError, "prompt must be a str"),
    (lambda m, t, v: generate_response(m, t, "ok", 0), ValueError, "max_new_tokens"),
    (lambda m, t, v: generate_response(m, t, "ok", temperature=-1.0), ValueError, "temperature must be >= 0"),
    (lambda m, t, v: generate_response(m, t, "ok", system_prompt=1), TypeError, "system_prompt must be a str"),
])
def test_bad_arguments_are_named(call, error, message):
    model, tokenizer = make_model("llama"), chat_tokenizer()
    with pytest.raises(error, match=message):
        call(model, tokenizer, planted_vector(model, tokenizer))


def test_hooks_and_flags_are_restored_after_an_error(monkeypatch):
    model, tokenizer = make_model("llama"), chat_tokenizer(padding_side="left")

    def failing_generate(*args, **kwargs):
        raise RuntimeError("generation failed")

    monkeypatch.setattr(model, "generate", failing_generate)
    model.train()
    with pytest.raises(RuntimeError, match="generation failed"):
        strength_sweep(model, tokenizer, planted_vector(model, tokenizer), PROMPTS, says_word, [2.0],
                       show_progress=False)
    assert model.training and hook_count(model) == 0 and tokenizer.padding_side == "left"
