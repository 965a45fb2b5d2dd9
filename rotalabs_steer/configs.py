"""Architecture facts and recommended layers of known models, and inference for others."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

from .datasets.builtin import BEHAVIORS



@dataclass
class ModelConfig:
    """Layer count, hidden size and per-behaviour recommended layers of one model."""

    name: str
    num_layers: int
    hidden_size: int
    layer_template: str = "model.layers.{i}"
    residual_template: str = "model.layers.{i}"
    mlp_template: str | None = "model.layers.{i}.mlp"
    attn_template: str | None = "model.layers.{i}.self_attn"
    recommended_layers: dict[str, list[int]] = field(default_factory=dict)

    def get_recommended_layers(self, behavior: str) -> list[int]:
        """Recommended layers for ``behavior``; the middle third of the blocks otherwise."""
        if behavior in self.recommended_layers:
            return list(self.recommended_layers[behavior])
        return list(range(self.num_layers // 3, 2 * self.num_layers // 3))


def _span(start: int, count: int, step: int = 1) -> list[int]:
    return list(range(start, start + count * step, step))


def _layers_by_behavior(**spans: list[int]) -> dict[str, list[int]]:
    missing = set(BEHAVIORS) - set(spans)
    assert not missing, missing
    return dict(spans)


# Recommended layers as published with the reference package (kept for drop-in parity).
_QWEN3_36 = _layers_by_behavior(
    refusal=_span(14, 5), uncertainty=_span(12, 5), tool_restraint=_span(16, 5),
    instruction_hierarchy=_span(14, 5), formality=_span(14, 5), conciseness=_span(10, 5),
    creativity=_span(18, 5), assertiveness=_span(12, 5), humor=_span(16, 5),
    empathy=_span(14, 5), technical_depth=_span(12, 5),
)
_QWEN_48 = _layers_by_behavior(
    refusal=_span(20, 5), uncertainty=_span(16, 5), tool_restraint=_span(22, 5),
    instruction_hierarchy=_span(20, 5), formality=_span(20, 5), conciseness=_span(14, 5),
    creativity=_span(24, 5), assertiveness=_span(16, 5), humor=_span(22, 5),
    empathy=_span(20, 5), technical_depth=_span(16, 5),
)
_LLAMA_8B = _layers_by_behavior(
    refusal=_span(14, 3), uncertainty=_span(12, 3), tool_restraint=_span(16, 3),
    instruction_hierarchy=_span(14, 3), formality=_span(14, 3), conciseness=_span(10, 3),
    creativity=_span(16, 3), assertiveness=_span(12, 3), humor=_span(14, 3),
    empathy=_span(12, 3), technical_depth=_span(10, 3),
)
_LLAMA_70B = _layers_by_behavior(
    refusal=_span(35, 6), uncertainty=_span(30, 6), tool_restraint=_span(40, 6),
    instruction_hierarchy=_span(35, 6), formality=_span(35, 6), conciseness=_span(25, 6),
    creativity=_span(40, 6), assertiveness=_span(30, 6), humor=_span(38, 6),
    empathy=_span(35, 6), technical_depth=_span(30, 6),
)
_MISTRAL_7B = _layers_by_behavior(
    refusal=_span(12, 5, 2), uncertainty=_span(10, 4, 2), tool_restraint=_span(14, 4, 2),
    instruction_hierarchy=_span(12, 4, 2), formality=_span(12, 4, 2), conciseness=_span(8, 4, 2),
    creativity=_span(16, 4, 2), assertiveness=_span(10, 4, 2), humor=_span(14, 4, 2),
    empathy=_span(12, 4, 2), technical_depth=_span(10, 4, 2),
)
_GPT_OSS_20B = _layers_by_behavior(
    refusal=_span(8, 5, 2), uncertainty=_span(6, 4, 2), tool_restraint=_span(10, 4, 2),
    instruction_hierarchy=_span(8, 4, 2), formality=_span(8, 4, 2), conciseness=_span(6, 5),
    creativity=_span(12, 5), assertiveness=_span(6, 4, 2), humor=_span(10, 5),
    empathy=_span(8, 4, 2), technical_depth=_span(6, 4, 2),
)
_GEMMA2_9B = _layers_by_behavior(
    refusal=_span(14, 5, 2), uncertainty=_span(12, 4, 2), tool_restraint=_span(16, 4, 2),
    instruction_hierarchy=_span(14, 4, 2), formality=_span(14, 4, 2), conciseness=_span(10, 4, 2),
    creativity=_span(20, 4, 2), assertiveness=_span(12, 4, 2), humor=_span(16, 4, 2),
    empathy=_span(14, 4, 2), technical_depth=_span(12, 4, 2),
)


def _config(name: str, num_layers: int, hidden_size: int, layers: dict[str, list[int]]) -> ModelConfig:
    return ModelConfig(name=name, num_layers=num_layers, hidden_size=hidden_size,
                       recommended_layers={k: list(v) for k, v in layers.items()})


MODEL_CONFIGS: dict[str, ModelConfig] = {
    c.name: c
    for c in (
        _config("Qwen/Qwen3-8B", 36, 4096, _QWEN3_36),
        _config("Qwen/Qwen3-4B", 36, 2560, _QWEN3_36),
        _config("Qwen/Qwen3-14B", 48, 5120, _QWEN_48),
        _config("deepseek-ai/DeepSeek-R1-Distill-Qwen-14B", 48, 5120, _QWEN_48),
        _config("meta-llama/Llama-3.1-8B-Instruct", 32, 4096, _LLAMA_8B),
        _config("meta-llama/Llama-3.1-70B-Instruct", 80, 8192, _LLAMA_70B),
        _config("mistralai/Mistral-7B-Instruct-v0.2", 32, 4096, _MISTRAL_7B),
        _config("mistralai/Mistral-7B-Instruct-v0.3", 32, 4096, _MISTRAL_7B),
        _config("openai/gpt-oss-20b", 24, 2880, _GPT_OSS_20B),
        _config("google/gemma-2-9b-it", 42, 3584, _GEMMA2_9B),
    )
}
# The bundled default model (rotalabs_steer.bundled_model). Refusal layers measured here: blocks 12-16
# give the best held-out separation and a monotone dose-response of refusal-token log-probability;
# other behaviours fall back to the middle third until measured.
MODEL_CONFIGS["HuggingFaceTB/SmolLM2-135M-Instruct"] = ModelConfig(
    name="HuggingFaceTB/SmolLM2-135M-Instruct", num_layers=30, hidden_size=576,
    recommended_layers={"refusal": _span(12, 5)},
)


def get_model_config(model_name: str) -> ModelConfig:
    """Config of a known model: exact name first, then a case-insensitive partial match."""
    if not isinstance(model_name, str) or not model_name:
        raise TypeError(f"model_name must be a non-empty str, got {model_name!r}")
    found = _find_config(model_name)
    if found is None:
        raise ValueError(f"no config for model {model_name!r}; known: {sorted(MODEL_CONFIGS)}")
    key, config, exact = found
    if not exact:
        warnings.warn(f"no config for {model_name!r}: using {key!r}, which matches by name only; "
                      "for a loaded model, infer_model_config(model) checks its layer count and "
                      "hidden size", stacklevel=2)
    return config


def _find_config(model_name: str) -> tuple[str, ModelConfig, bool] | None:
    """(key, config, exact): exact name, then case-insensitive, then a partial match."""
    if model_name in MODEL_CONFIGS:
        return model_name, MODEL_CONFIGS[model_name], True
    wanted = model_name.lower()
    for key, config in MODEL_CONFIGS.items():
        if key.lower() == wanted:
            return key, config, True
    for key, config in MODEL_CONFIGS.items():
        if key.lower() in wanted or wanted in key.lower():
            return key, config, False
    return None


def infer_model_config(model) -> ModelConfig:
    """Config of a loaded model: the known entry for its name, else read off its structure.

    Read off the structure, the templates are the real module paths of this model, e.g.
    GPT-2 ``transformer.h.{i}.attn``, GPT-NeoX ``gpt_neox.layers.{i}.attention``, OPT's MLP
    ``model.decoder.layers.{i}.fc2``; ``mlp_template`` / ``attn_template`` are None when the
    blocks have no such submodule under a name we know (pass ``layer_modules=`` then).
    """
    from .layers import find_decoder_blocks, hidden_size_of

    name = getattr(getattr(model, "config", None), "_name_or_path", "") or ""
    blocks = find_decoder_blocks(model)
    hidden = hidden_size_of(model)
    found = _find_config(name) if name else None  # a name-only match is checked against the model here
    if found is not None:
        known = found[1]
        if (known.num_layers, known.hidden_size) == (len(blocks.modules), hidden):
            return known
        warnings.warn(
            f"model {name!r} has {len(blocks.modules)} blocks of width {hidden}, but the "
            f"config {known.name!r} its name matches has {known.num_layers} of width {known.hidden_size}: "
            "ignoring that config's recommended layers", stacklevel=2)
    template = f"{blocks.path}.{{i}}" if blocks.path else "{i}"
    return ModelConfig(
        name=name or "unknown",
        num_layers=len(blocks.modules),
        hidden_size=hidden,
        layer_template=template,
        residual_template=template,
        mlp_template=_component_template(blocks.modules, template, "mlp"),
        attn_template=_component_template(blocks.modules, template, "attn"),
    )


def _component_template(blocks, template: str, component: str) -> str | None:
    """``template`` extended by the path of ``component`` inside the blocks, if every block has it there."""
    from .layers import component_module

    try:
        paths = {component_module(block, component)[1] for block in blocks}
    except ValueError:
        return None
    if len(paths) != 1:
        return None
    return f"{template}.{paths.pop()}"
