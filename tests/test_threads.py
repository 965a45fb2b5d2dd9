"""Extraction from threads, and interrupted extractions.

- Two threads extracting on two different models at the same time get exactly what each
  gets alone (the C accumulators are per call and release the GIL while reducing).
- A KeyboardInterrupt in the middle of an extraction (raised from a hook on the second
  batch, or delivered asynchronously like Ctrl-C) propagates, returns nothing, and leaves
  no hook, no changed training flag and no changed logits; the next extraction is exact.
"""

from __future__ import annotations

import _thread
import signal
import threading
import time

import pytest
import torch

from rotalabs_steer.extraction import extract_caa_vectors
from tiny_models import hook_count, make_model, make_tokenizer, refusal_pairs

LAYERS = [0, 2]




def logits(model):
    ids = torch.tensor([make_tokenizer()("User: still the same?")["input_ids"]])
    torch.manual_seed(0)  # a model left in training mode runs dropout: same seed, same masks
    with torch.no_grad():
        return model(input_ids=ids).logits.clone()


def extract(model, **kwargs):
    kwargs.setdefault("batch_size", 2)
    return extract_caa_vectors(model, make_tokenizer(), refusal_pairs(), LAYERS, show_progress=False, **kwargs)


def assert_same_sets(got, want):
    assert got.layers == want.layers
    for layer in want.layers:
        assert torch.equal(got[layer].vector, want[layer].vector), layer
        for key in ("num_pairs", "num_positive", "num_negative", "pos_mean_norm", "neg_mean_norm"):
            assert got[layer].metadata[key] == want[layer].metadata[key], key


def test_two_threads_two_models_match_single_threaded():
    models = {"llama": make_model("llama"), "gpt2": make_model("gpt2", seed=3)}
    alone = {name: extract(model) for name, model in models.items()}

    # When each thread's forwards ran, to show that the two extractions really overlapped.
    spans: dict[str, list[float]] = {name: [] for name in models}
    handles = [
        model.get_input_embeddings().register_forward_pre_hook(
            lambda module, args, name=name: spans[name].append(time.monotonic()))
        for name, model in models.items()
    ]
    barrier = threading.Barrier(len(models))
    results, errors = {}, []

    def work(name):
        try:
            barrier.wait()
            results[name] = extract(models[name], batch_size=1)  # many forwards: a long overlap
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append((name, e))

    threads = [threading.Thread(target=work, args=(name,)) for name in models]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
    finally:
        for handle in handles:
            handle.remove()
    assert not any(t.is_alive() for t in threads)
    assert errors == []
    # batch_size does not change the answer beyond float32 round-off; compare with batch 1 alone too
    alone_b1 = {name: extract(model, batch_size=1) for name, model in models.items()}
    for name in models:
        assert_same_sets(results[name], alone_b1[name])
        for layer in LAYERS:
            torch.testing.assert_close(results[name][layer].vector, alone[name][layer].vector,
                                       rtol=1e-5, atol=1e-6)
        assert hook_count(models[name]) == 0
    (a_start, a_end), (b_start, b_end) = ((min(s), max(s)) for s in spans.values())
    assert a_start < b_end and b_start < a_end, "the two extractions did not overlap"


def test_threads_on_the_same_tokenizer_and_pairs_are_independent():
    """Several threads, each with its own model copy but one shared tokenizer and pair list."""
    tokenizer, shared_pairs = make_tokenizer(), refusal_pairs(4)
    models = [make_model("qwen3", seed=s) for s in (0, 1, 2)]
    alone = [extract_caa_vectors(m, tokenizer, shared_pairs, LAYERS, show_progress=False, batch_size=3)
             for m in models]
    results = [None] * len(models)
    errors = []

    def work(k):
        try:
            results[k] = extract_caa_vectors(models[k], tokenizer, shared_pairs, LAYERS, show_progress=False,
                                             batch_size=3)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(len(models))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert errors == []
    for got, want in zip(results, alone):
        assert_same_sets(got, want)
    assert tokenizer.padding_side == "right"


def _interrupt_on_second_batch(block, how):
    calls = {"n": 0}

    def pre_hook(module, args):
        calls["n"] += 1
        if calls["n"] == 2:
            if how == "raise":
                raise KeyboardInterrupt
            _thread.interrupt_main()  # like Ctrl-C: raised at the next bytecode boundary
            for _ in range(1000):  # let the pending signal fire inside the forward
                time.sleep(0)

    return block.register_forward_pre_hook(pre_hook), calls


@pytest.fixture
def python_sigint_handler():
    """Python's own Ctrl-C handler: a shell starts background jobs with SIGINT ignored, and then
    ``_thread.interrupt_main`` does nothing."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.mark.parametrize("how", ["raise", "signal"])
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_keyboard_interrupt_mid_extraction_leaves_nothing(kind, how, python_sigint_handler):
    model = make_model(kind)
    model.train()
    model.get_input_embeddings().eval()  # a mixed state must come back as it was
    flags = [m.training for m in model.modules()]
    expected = extract(model)
    before_logits = logits(model)
    blocks = model.model.layers if kind == "llama" else model.transformer.h
    handle, calls = _interrupt_on_second_batch(blocks[1], how)
    result = "untouched"
    with pytest.raises(KeyboardInterrupt):
        result = extract(model)
    handle.remove()
    assert calls["n"] == 2  # it stopped in the second batch: nothing after it ran
    assert result == "untouched"  # nothing partial came back
    assert hook_count(model) == 0
    assert [m.training for m in model.modules()] == flags
    assert torch.equal(logits(model), before_logits)
    # no state carried over: the next extraction is the clean one, bit for bit
    assert_same_sets(extract(model), expected)


def test_keyboard_interrupt_in_a_thread_leaves_the_other_thread_exact():
    """One thread is interrupted mid-extraction while another extracts on another model."""
    victim, bystander = make_model("llama"), make_model("qwen3", seed=5)
    want = extract(bystander)
    handle, _ = _interrupt_on_second_batch(victim.model.layers[0], "raise")
    outcome = {}

    def run(name, model):
        try:
            outcome[name] = extract(model)
        except KeyboardInterrupt:
            outcome[name] = "interrupted"

    threads = [threading.Thread(target=run, args=args) for args in (("victim", victim), ("bystander", bystander))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    handle.remove()
    assert outcome["victim"] == "interrupted"
    assert hook_count(victim) == 0 and hook_count(bystander) == 0
    assert_same_sets(outcome["bystander"], want)


@pytest.mark.parametrize("second", [{}, {"layers": [1, 3]}, {"component": "mlp"}],
                         ids=["same-layers", "other-layers", "mlp-of-same-layers"])
def test_a_second_extraction_on_the_same_model_is_refused_while_one_runs(second):
    """Hooks belong to the model: a concurrent extraction, on any layers or component, would
    fire the other's hooks and mix both threads' forwards."""
    model = make_model("llama")
    want = extract(model)
    slow = model.model.layers[0].register_forward_pre_hook(lambda *args: time.sleep(0.2))
    results, errors = [], []
    worker = threading.Thread(target=lambda: results.append(extract(model)))
    try:
        worker.start()
        deadline = time.monotonic() + 30
        while not model.model.layers[2]._forward_hooks and time.monotonic() < deadline:
            time.sleep(0.01)  # until the worker's hooks are on
        try:
            layers = second.get("layers", LAYERS)
            extract_caa_vectors(model, make_tokenizer(), refusal_pairs(), layers, show_progress=False, batch_size=2,
                                component=second.get("component", "residual"))
        except RuntimeError as error:
            errors.append(str(error))
        worker.join()
    finally:
        slow.remove()
    assert errors and "another extraction is running on this model" in errors[0]
    assert_same_sets(results[0], want)
    assert hook_count(model) == 0
    assert_same_sets(extract(model), want)  # free again afterwards
