"""Model configs: known architectures, recommended layers, inference from a loaded model."""

from __future__ import annotations

import pytest

from rotalabs_steer import MODEL_CONFIGS, ModelConfig, get_model_config, infer_model_config
from rotalabs_steer.configs import BEHAVIORS
from tiny_models import NUM_LAYERS, make_model

ARCHITECTURE_FACTS = {
    "Qwen/Qwen3-4B": (36, 2560),
    "Qwen/Qwen3-8B": (36, 4096),
    "Qwen/Qwen3-14B": (48, 5120),
    "deepseek-ai/DeepSeek-R1-Distill-Qwen-14B": (48, 5120),
    "meta-llama/Llama-3.1-8B-Instruct": (32, 4096),
    "meta-llama/Llama-3.1-70B-Instruct": (80, 8192),
    "mistralai/Mistral-7B-Instruct-v0.2": (32, 4096),
    "mistralai/Mistral-7B-Instruct-v0.3": (32, 4096),
    "openai/gpt-oss-20b": (24, 2880),
    "google/gemma-2-9b-it": (42, 3584),
}


@pytest.mark.parametrize("name", sorted(ARCHITECTURE_FACTS))
def test_known_models(name):
    config = MODEL_CONFIGS[name]
    assert (config.num_layers, config.hidden_size) == ARCHITECTURE_FACTS[name]
    for behavior in BEHAVIORS:
        layers = config.get_recommended_layers(behavior)
        assert layers and all(0 <= i < config.num_layers for i in layers)
        assert layers == sorted(set(layers))


def test_documented_examples():
    assert get_model_config("Qwen/Qwen3-8B").get_recommended_layers("refusal") == [14, 15, 16, 17, 18]
    assert get_model_config("meta-llama/Llama-3.1-8B-Instruct").get_recommended_layers("refusal") == [14, 15, 16]


def test_partial_match_and_errors():
    assert get_model_config("qwen/qwen3-8b").name == "Qwen/Qwen3-8B"
    with pytest.warns(UserWarning, match="no config for 'my-org/Qwen/Qwen3-14B-finetuned': using 'Qwen/Qwen3-14B'"):
        assert get_model_config("my-org/Qwen/Qwen3-14B-finetuned").name == "Qwen/Qwen3-14B"
    with pytest.raises(ValueError, match="no config"):
        get_model_config("totally-unknown/model")


def test_default_is_middle_third():
    assert ModelConfig("x", 30, 8).get_recommended_layers("anything") == list(range(10, 20))
    recommended = MODEL_CONFIGS["Qwen/Qwen3-8B"].get_recommended_layers("refusal")
    recommended.append(99)  # callers get a copy
    assert 99 not in MODEL_CONFIGS["Qwen/Qwen3-8B"].get_recommended_layers("refusal")


@pytest.mark.parametrize("kind,path", [("llama", "model.layers"), ("qwen3", "model.layers"), ("gpt2", "transformer.h")])
def test_infer_from_loaded_model(kind, path):
    config = infer_model_config(make_model(kind))
    assert config.num_layers == NUM_LAYERS and config.hidden_size == 64
    assert config.layer_template == f"{path}.{{i}}"


def test_infer_uses_known_name_when_the_model_matches_it(monkeypatch):
    model = make_model("llama")
    model.config._name_or_path = "my-org/tiny-llama"
    known = ModelConfig("my-org/tiny-llama", NUM_LAYERS, 64, recommended_layers={"refusal": [2]})
    monkeypatch.setitem(MODEL_CONFIGS, "my-org/tiny-llama", known)
    assert infer_model_config(model) is known


def test_infer_ignores_a_known_name_the_model_does_not_match():
    """A fine-tune saved under another model's name must not get that model's layers."""
    model = make_model("llama")
    model.config._name_or_path = "meta-llama/Llama-3.1-8B-Instruct"
    with pytest.warns(UserWarning, match=rf"has {NUM_LAYERS} blocks of width 64, but the config .* has 32 of width 4096"):
        config = infer_model_config(model)
    assert config.num_layers == NUM_LAYERS and config.layer_template == "model.layers.{i}"
