"""Finding the decoder blocks of a HuggingFace model, and resolving layer indices.

Layer ``i`` always means the output of decoder block ``i`` (0-based): for every block
but the last that is ``hidden_states[i + 1]`` of ``output_hidden_states=True``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from torch import nn

from .model_control import input_embeddings
from .validation import layer_in_range

# Where the common architectures keep their blocks, most common first.
KNOWN_BLOCK_PATHS = (
    "model.layers",                      # Llama, Mistral, Mixtral, Qwen2/3 (+MoE), Gemma 1-3, Phi, Phi-3,
                                         # StableLM, OLMo 2, Cohere, GPT-OSS
    "model.language_model.layers",       # vision-language wrappers (Llava, Gemma 3, Qwen2-VL, ...)
    "language_model.model.layers",       # older vision-language wrappers
    "transformer.h",                     # GPT-2, GPT-J, Falcon, BLOOM, CodeGen
    "gpt_neox.layers",                   # GPT-NeoX, Pythia
    "model.decoder.layers",              # OPT
    "transformer.blocks",                # MPT
    "transformer.layers",
    "layers",                            # a bare decoder (LlamaModel, Qwen2Model, ...)
    "h",                                 # a bare GPT2Model
    "decoder.layers",                    # a bare OPTModel
)


@dataclass(frozen=True)
class DecoderBlocks:
    """The blocks of a model in order, and the module path they were found at."""

    modules: tuple[nn.Module, ...]
    path: str | None

    def __len__(self) -> int:
        return len(self.modules)


def _get_submodule(model: nn.Module, path: str) -> nn.Module | None:
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


def _num_layers_in_config(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    config = getattr(config, "get_text_config", lambda: config)() if config is not None else None
    for key in ("num_hidden_layers", "n_layer", "num_layers", "n_layers"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def find_decoder_blocks(
    model: nn.Module, layer_modules: str | Sequence[nn.Module] | None = None
) -> DecoderBlocks:
    """The decoder blocks of ``model``.

    ``layer_modules`` overrides discovery: a path template such as ``"model.layers.{i}"``
    or an explicit sequence of modules.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, not {type(model).__name__}")
    if layer_modules is not None:
        return _blocks_from_override(model, layer_modules)
    for path in KNOWN_BLOCK_PATHS:
        module = _get_submodule(model, path)
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            return DecoderBlocks(tuple(module), path)
    # Unknown layout: the ModuleList whose length matches the configured layer count.
    expected = _num_layers_in_config(model)
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and expected is not None and len(module) == expected:
            return DecoderBlocks(tuple(module), name)
    raise ValueError(
        f"cannot find the decoder blocks of {type(model).__name__}: tried "
        f"{', '.join(KNOWN_BLOCK_PATHS)} and any ModuleList of length "
        f"{expected if expected is not None else '<num_hidden_layers>'}; pass "
        "layer_modules='path.to.layers.{i}' or a list of the block modules"
    )


def _blocks_from_override(model: nn.Module, layer_modules: str | Sequence[nn.Module]) -> DecoderBlocks:
    if isinstance(layer_modules, str):
        template = layer_modules
        if "{i}" not in template:
            raise ValueError(f"layer_modules template must contain '{{i}}', got {template!r}")
        modules = []
        while (module := _get_submodule(model, template.format(i=len(modules)))) is not None:
            modules.append(module)
        if not modules:
            raise ValueError(f"layer_modules template {template!r} matches no module of the model")
        return DecoderBlocks(tuple(modules), template.removesuffix(".{i}"))
    modules = tuple(layer_modules)
    if not modules or not all(isinstance(m, nn.Module) for m in modules):
        raise TypeError("layer_modules must be a path template or a non-empty list of nn.Module")
    return DecoderBlocks(modules, None)


def resolve_layer_indices(layer_indices: Sequence[int], num_layers: int, name: str = "layer_indices") -> list[int]:
    """Validate layer indices (Python-style negatives allowed) and return them non-negative."""
    if isinstance(layer_indices, (str, bytes)) or not hasattr(layer_indices, "__iter__"):
        raise TypeError(f"{name} must be a list of ints, not {type(layer_indices).__name__}")
    resolved = [layer_in_range(raw, num_layers, f"{name}[{k}]") for k, raw in enumerate(layer_indices)]
    if not resolved:
        raise ValueError(f"{name} must name at least one layer")
    duplicates = sorted({i for i in resolved if resolved.count(i) > 1})
    if duplicates:
        raise ValueError(f"{name} names layer(s) {duplicates} more than once")
    return resolved


def hidden_size_of(model: nn.Module) -> int:
    """Width of the residual stream."""
    config = getattr(model, "config", None)
    config = getattr(config, "get_text_config", lambda: config)() if config is not None else None
    for key in ("hidden_size", "n_embd", "d_model"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    embeddings = input_embeddings(model)
    if embeddings is not None and hasattr(embeddings, "embedding_dim"):
        return int(embeddings.embedding_dim)
    raise ValueError(f"cannot tell the hidden size of {type(model).__name__} from its config")


COMPONENTS = ("residual", "mlp", "attn")

# Submodule of a decoder block whose output is the component, in the order tried.
# Names in transformers 5: mlp (also the MoE blocks of Mixtral, Qwen2/3-MoE, GPT-OSS, whose
# output is a (hidden, router_scores) tuple in GPT-OSS); self_attn, attn (GPT-2, GPT-J),
# attention (GPT-NeoX), self_attention (Falcon, BLOOM). OPT has no MLP module: its
# feed-forward ends in fc2, whose output is the MLP output, flattened to [batch * seq, hidden].
_COMPONENT_NAMES = {
    "mlp": ("mlp", "feed_forward", "block_sparse_moe", "ffn", "fc2"),
    "attn": ("self_attn", "attn", "attention", "self_attention"),
}


def component_module(block: nn.Module, component: str) -> tuple[nn.Module, str]:
    """The module of ``block`` whose output is ``component``, and its path inside the block.

    ``"residual"`` is the block itself (path ``""``); ``"mlp"`` and ``"attn"`` are the
    feed-forward and self-attention submodules under whatever name the architecture uses.
    """
    if component not in COMPONENTS:
        raise ValueError(f"component must be one of {COMPONENTS}, got {component!r}")
    if component == "residual":
        return block, ""
    for name in _COMPONENT_NAMES[component]:
        module = getattr(block, name, None)
        if isinstance(module, nn.Module):
            return module, name
    children = ", ".join(name for name, _ in block.named_children()) or "none"
    raise ValueError(
        f"component={component!r}: {type(block).__name__} has no submodule named "
        f"{' / '.join(_COMPONENT_NAMES[component])} (its children: {children}); pass "
        "layer_modules= with the modules whose outputs you want"
    )
