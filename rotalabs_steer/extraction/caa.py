"""Contrastive Activation Addition: vector = mean(positive rows) - mean(negative rows).

All requested layers share one forward per batch; positive and negative texts share
batches (bucketed by length); the forward stops after the deepest requested block.
Sums are float64 in the C accumulator, so the result does not depend on batch size,
padding or pair order beyond float32 round-off of the model itself.
"""

from __future__ import annotations

import math
import operator
from typing import Literal, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from .. import _core
from ..batching import NEGATIVE, POSITIVE, TOKEN_POSITIONS, make_batches, pad_token_id, tokenize
from ..capture import accumulate_batches
from ..datasets.base import ContrastPairDataset, as_contrast_pairs
from ..layers import find_decoder_blocks, hidden_size_of, resolve_layer_indices
from ..vectors import SteeringVector, SteeringVectorSet

TokenPosition = Literal["last", "first", "mean"]
DEFAULT_MAX_LENGTH = 512


def extract_caa_vector(
    model,
    tokenizer,
    contrast_pairs: ContrastPairDataset | list[dict],
    layer_idx: int,
    token_position: TokenPosition = "last",
    batch_size: int = 1,
    show_progress: bool = True,
    *,
    max_length: int = DEFAULT_MAX_LENGTH,
    layer_modules=None,
) -> SteeringVector:
    """Extract the CAA steering vector of one layer (the output of decoder block ``layer_idx``).

    ``batch_size`` texts run per forward. See ``extract_caa_vectors`` for the keywords.
    """
    if isinstance(layer_idx, (list, tuple)):
        raise TypeError("layer_idx must be a single int; use extract_caa_vectors for several layers")
    vectors = _extract(model, tokenizer, contrast_pairs, [layer_idx], "layer_idx", token_position,
                       show_progress, batch_size, max_length, layer_modules)
    return next(iter(vectors))


def extract_caa_vectors(
    model,
    tokenizer,
    contrast_pairs: ContrastPairDataset | list[dict],
    layer_indices: Sequence[int],
    token_position: TokenPosition = "last",
    show_progress: bool = True,
    *,
    batch_size: int = 1,
    max_length: int = DEFAULT_MAX_LENGTH,
    layer_modules=None,
) -> SteeringVectorSet:
    """Extract CAA steering vectors for several layers in one pass over the pairs.

    Args:
        model: a HuggingFace causal LM (any device, dtype or ``device_map``).
        tokenizer: its tokenizer; texts are tokenized as ``tokenizer(text, truncation=True,
            max_length=max_length)``. It is never modified.
        contrast_pairs: a ContrastPairDataset or a list of ``{"positive", "negative"}`` dicts.
        layer_indices: decoder blocks whose outputs are read (negative indices count from the end).
        token_position: ``"last"`` / ``"first"`` real token of each text, or ``"mean"`` over its
            real tokens.
        show_progress: show a tqdm bar over texts.
        batch_size: texts per forward pass.
        max_length: truncation length in tokens (the reference's 512 by default).
        layer_modules: override block discovery: ``"path.to.layers.{i}"`` or a list of modules.
    """
    return _extract(model, tokenizer, contrast_pairs, layer_indices, "layer_indices", token_position,
                    show_progress, batch_size, max_length, layer_modules)


def _extract(model, tokenizer, contrast_pairs, layer_indices, layers_arg: str, token_position,
             show_progress, batch_size, max_length, layer_modules) -> SteeringVectorSet:
    if token_position not in TOKEN_POSITIONS:
        raise ValueError(f"token_position must be one of {TOKEN_POSITIONS}, got {token_position!r}")
    batch_size = _positive_int(batch_size, "batch_size")
    max_length = _positive_int(max_length, "max_length")
    behavior, pairs = as_contrast_pairs(contrast_pairs)
    if not pairs:
        raise ValueError("contrast_pairs is empty; need at least one positive/negative pair")

    blocks = find_decoder_blocks(model, layer_modules)
    layers = resolve_layer_indices(layer_indices, len(blocks), layers_arg)
    hidden = hidden_size_of(model)

    texts = [p.positive for p in pairs] + [p.negative for p in pairs]
    groups = [POSITIVE] * len(pairs) + [NEGATIVE] * len(pairs)
    token_ids = tokenize(tokenizer, texts, max_length)
    batches = make_batches(token_ids, groups, token_position, batch_size, pad_token_id(tokenizer))

    accumulator = _core.Accumulator(len(layers), hidden)
    with tqdm(total=len(texts), unit="text", desc=f"CAA layers {layers}", disable=not show_progress) as bar:
        accumulate_batches(model, [blocks.modules[i] for i in layers], batches, accumulator,
                           on_batch=lambda batch: bar.update(batch.num_rows))

    sums, counts = accumulator.state()
    model_name = getattr(getattr(model, "config", None), "_name_or_path", "") or "unknown"
    vectors = [
        _make_vector(sums[slot], counts[slot], layer, behavior, model_name, token_position,
                     len(pairs), batch_size, model)
        for slot, layer in enumerate(layers)
    ]
    return SteeringVectorSet(behavior, vectors)


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool):
        raise TypeError(f"{name} must be a positive int, got {value!r}")
    try:
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be a positive int, got {value!r} ({type(value).__name__})") from None
    if value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value}")
    return value


def _make_vector(
    sums: np.ndarray, counts: np.ndarray, layer: int, behavior: str, model_name: str,
    token_position: str, num_pairs: int, batch_size: int, model,
) -> SteeringVector:
    pos_mean = sums[POSITIVE] / counts[POSITIVE]
    neg_mean = sums[NEGATIVE] / counts[NEGATIVE]
    difference = pos_mean - neg_mean
    if not (np.isfinite(pos_mean).all() and np.isfinite(neg_mean).all()):
        raise ValueError(
            f"activations at layer {layer} contain NaN or inf (model dtype "
            f"{_model_dtype(model)}); no vector was produced. Check the model weights or "
            "run it in a wider dtype (float32/bfloat16 instead of float16)"
        )
    vector_norm = float(np.linalg.norm(difference))
    return SteeringVector(
        behavior=behavior,
        layer_index=layer,
        vector=torch.from_numpy(difference).to(torch.float32),
        model_name=model_name,
        extraction_method="caa",
        metadata={
            "num_pairs": num_pairs,
            "token_position": token_position,
            "pos_mean_norm": float(np.linalg.norm(pos_mean)),
            "neg_mean_norm": float(np.linalg.norm(neg_mean)),
            "vector_norm": vector_norm,
            "num_positive": int(counts[POSITIVE]),
            "num_negative": int(counts[NEGATIVE]),
            "cosine_pos_neg": _cosine(pos_mean, neg_mean),
            "batch_size": batch_size,
            "model_dtype": _model_dtype(model),
            "layer_semantics": "output of decoder block layer_index (hidden_states[layer_index + 1])",
        },
    )


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    denominator = float(np.linalg.norm(a) * np.linalg.norm(b))
    return float(a @ b) / denominator if denominator > 0 and math.isfinite(denominator) else 0.0


def _model_dtype(model) -> str:
    parameter = next(model.parameters(), None)
    return str(parameter.dtype).removeprefix("torch.") if parameter is not None else "unknown"
