"""Contrastive Activation Addition: vector = mean(positive rows) - mean(negative rows).

All requested layers share one forward per batch; positive and negative texts share
batches (bucketed by length); the forward stops after the deepest requested block.
Sums are float64 in the C accumulator, so the result does not depend on batch size,
padding or pair order beyond float32 round-off of the model itself.
"""

from __future__ import annotations

import math
from typing import Literal, Sequence

import numpy as np
import torch

from .. import _core
from ..datasets.base import ContrastPairDataset, as_contrast_pairs
from ..layers import COMPONENTS, component_module, find_decoder_blocks, hidden_size_of, resolve_layer_indices
from ..model_control import input_embeddings
from ..progress import progress_bar
from ..validation import as_int, check_choice, int_at_least, layer_in_range
from ..vectors import SteeringVector, SteeringVectorSet
from .batching import NEGATIVE, POSITIVE, TOKEN_POSITIONS, pad_token_id, tokenize
from .distributed import all_reduce_state, gather_samples, rank_and_size, resolve_group, share_of_rows
from . import shared_prefix
from .forward import REDUCE_ON
from .separation import DEFAULT_FOLDS, fold_of_pairs, held_out_projections, projection_figures

TokenPosition = Literal["last", "first", "mean", "answer"]
DEFAULT_MAX_LENGTH = 512
DEFAULT_SEPARATION_SAMPLE = 512


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
    separation_sample: int = DEFAULT_SEPARATION_SAMPLE,
    component: str = "residual",
    process_group=None,
    reduce_on: str = "auto",
    share_prefix: bool | None = None,
) -> SteeringVector:
    """Extract the CAA steering vector of one layer (the output of decoder block ``layer_idx``).

    ``batch_size`` texts run per forward. See ``extract_caa_vectors`` for the keywords.
    """
    if isinstance(layer_idx, (list, tuple)):
        raise TypeError("layer_idx must be a single int; use extract_caa_vectors for several layers")
    vectors = _extract(model, tokenizer, contrast_pairs, as_int(layer_idx, "layer_idx"), token_position,
                       show_progress, batch_size, max_length, layer_modules, separation_sample,
                       component, process_group, reduce_on, share_prefix, single_layer=True)
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
    separation_sample: int = DEFAULT_SEPARATION_SAMPLE,
    component: str = "residual",
    process_group=None,
    reduce_on: str = "auto",
    share_prefix: bool | None = None,
) -> SteeringVectorSet:
    """Extract CAA steering vectors for several layers in one pass over the pairs.

    Args:
        model: a HuggingFace causal LM (any device, dtype or ``device_map``).
        tokenizer: its tokenizer; texts are tokenized as ``tokenizer(text, truncation=True,
            max_length=max_length)``. It is never modified.
        contrast_pairs: a ContrastPairDataset or a list of ``{"positive", "negative"}`` dicts.
        layer_indices: decoder blocks whose outputs are read (negative indices count from the end).
        token_position: ``"last"`` / ``"first"`` real token of each text, ``"mean"`` over its
            real tokens, or ``"answer"``: the token holding the character recorded in each pair's
            metadata (``positive_answer_char`` / ``negative_answer_char``, set by
            ``datasets.load_caa_ab``), i.e. the A/B answer letter CAA reads.
        show_progress: show a tqdm bar over texts.
        batch_size: texts per forward pass.
        max_length: truncation length in tokens (the reference's 512 by default).
        layer_modules: override block discovery: ``"path.to.layers.{i}"`` or a list of modules.
        separation_sample: rows per layer kept (uniformly at random) to measure how well each
            vector separates held-out positive from negative rows (``metadata["separation_*"]``,
            ``get_best("separation")``); 0 turns it off. Memory: sample × hidden × 8 bytes a layer.
        component: ``"residual"`` (the block output, the default), ``"mlp"`` or ``"attn"``: the
            output of the block's feed-forward or self-attention submodule.
        process_group: a ``torch.distributed`` group to split the pairs over; by default the
            world group when ``torch.distributed`` is initialised (see ``distributed.py``).
            Every rank gets the same vectors.
        reduce_on: where rows are selected and summed: ``"auto"`` (in C for tensors on the
            host, with torch on the device for an accelerator's, with no host sync between
            batches), ``"host"`` (C only: an accelerator's tensors are an error), or
            ``"device"`` (torch on the tensors' own device, host tensors included).
        share_prefix: run the tokens both texts of a pair begin with once, then both endings
            from its KV cache (``shared_prefix.py``). ``None`` (default): wherever it pays;
            ``False``: never. ``metadata["shared_prefix*"]`` records what was done and why not.
    """
    return _extract(model, tokenizer, contrast_pairs, layer_indices, token_position,
                    show_progress, batch_size, max_length, layer_modules, separation_sample,
                    component, process_group, reduce_on, share_prefix)


def _extract(model, tokenizer, contrast_pairs, layer_indices: int | Sequence[int], token_position,
             show_progress, batch_size, max_length, layer_modules, separation_sample,
             component, process_group, reduce_on, share_prefix=None, single_layer: bool = False
             ) -> SteeringVectorSet:
    """``single_layer``: ``layer_indices`` is ``extract_caa_vector``'s one ``layer_idx``."""
    check_choice(token_position, TOKEN_POSITIONS, "token_position")
    check_choice(component, COMPONENTS, "component")
    check_choice(reduce_on, REDUCE_ON, "reduce_on")
    batch_size = int_at_least(batch_size, "batch_size", 1)
    max_length = int_at_least(max_length, "max_length", 1)
    separation_sample = int_at_least(separation_sample, "separation_sample", 0)
    if share_prefix not in (None, True, False):
        raise TypeError(f"share_prefix must be None, True or False, got {share_prefix!r}")
    if not isinstance(show_progress, bool):
        raise TypeError(f"show_progress must be a bool, got {show_progress!r}; batch_size and the "
                        "options after it are keyword-only in extract_caa_vectors (batch_size=...)")
    if not callable(tokenizer):
        raise TypeError(f"tokenizer must be a HuggingFace tokenizer (callable on a list of texts), "
                        f"not {type(tokenizer).__name__}")
    behavior, pairs = as_contrast_pairs(contrast_pairs)
    if not pairs:
        raise ValueError("contrast_pairs is empty; need at least one positive/negative pair")

    blocks = find_decoder_blocks(model, layer_modules)
    if single_layer:
        layers = [layer_in_range(layer_indices, len(blocks), "layer_idx")]
    else:
        layers = resolve_layer_indices(layer_indices, len(blocks))
    hidden = hidden_size_of(model)

    # Row group code: side + 2 * fold; sums per fold give held-out vectors for free.
    folds = min(DEFAULT_FOLDS, len(pairs))
    fold = fold_of_pairs(len(pairs), folds)
    texts = [p.positive for p in pairs] + [p.negative for p in pairs]
    row_groups = [POSITIVE + 2 * f for f in fold] + [NEGATIVE + 2 * f for f in fold]
    read_chars = _answer_chars(pairs) if token_position == "answer" else None
    token_ids, read_indices = tokenize(tokenizer, texts, max_length, read_chars)
    _check_fits_model(model, token_ids, max_length)
    modules = [component_module(blocks.modules[i], component)[0] for i in layers]

    ranks = resolve_group(process_group)
    rank, world_size = rank_and_size(ranks)
    mine = share_of_rows([len(row) for row in token_ids], ranks)

    accumulator = _core.Accumulator(len(layers), hidden, 2 * folds,
                                    sample_rows=separation_sample if folds > 1 else 0)
    show_progress = show_progress and rank == 0
    with progress_bar(total=len(mine), unit="text", desc=f"CAA layers {layers}", show=show_progress) as bar:
        reducer, prefix_info = None, {}
        if mine:
            reducer, prefix_info = shared_prefix.accumulate(
                model, modules, token_ids, row_groups, read_indices, mine, token_position, batch_size,
                pad_token_id(tokenizer), accumulator, bar.update, component != "residual", reduce_on,
                share_prefix, distributed=ranks is not None)
    if ranks is not None:
        all_reduce_state(accumulator, ranks)

    sums, counts = accumulator.state()
    model_name = getattr(getattr(model, "config", None), "_name_or_path", "") or "unknown"
    vectors = []
    for slot, layer in enumerate(layers):
        vector = _make_vector(sums[slot], counts[slot], layer, behavior, model_name, token_position,
                              len(pairs), batch_size, model, component)
        vector.metadata.update(prefix_info)
        if ranks is not None:
            vector.metadata["world_size"] = world_size
        if accumulator.sample_rows:
            samples = (reducer and reducer.samples(slot)) or accumulator.samples(slot)
            if ranks is not None:
                samples = gather_samples(*samples, ranks)
            positive, negative = held_out_projections(sums[slot], counts[slot], *samples)
            vector.held_out_projections = {"positive": positive, "negative": negative}
            figures = projection_figures(positive, negative)
            vector.metadata.update({f"separation_{k}": _finite_or_none(v) for k, v in figures.items()},
                                   separation_folds=folds)
            if len(samples[0]):
                # The unit of relative steering strengths: mean L2 norm of the selected rows, both
                # sides, from the uniform sample (every row when they fit in it).
                vector.metadata["activation_norm"] = float(np.linalg.norm(samples[0], axis=1).mean())
                vector.metadata["activation_norm_rows"] = int(len(samples[0]))
        vectors.append(vector)
    return SteeringVectorSet(behavior, vectors)


def _answer_chars(pairs) -> list[int]:
    """Character index of the answer in every positive text, then every negative one."""
    chars = {"positive": [], "negative": []}
    for i, pair in enumerate(pairs):
        for side in chars:
            char = pair.metadata.get(f"{side}_answer_char")
            text = getattr(pair, side)
            if isinstance(char, bool) or not isinstance(char, int) or not 0 <= char < len(text):
                raise ValueError(
                    f"contrast_pairs[{i}]: token_position='answer' needs metadata "
                    f"'{side}_answer_char' (a character index into the text), got {char!r}; "
                    "load A/B items with rotalabs_steer.datasets.load_caa_ab"
                )
            chars[side].append(char)
    return chars["positive"] + chars["negative"]


def _check_fits_model(model, token_ids, max_length: int) -> None:
    """Token ids the embedding has rows for, lengths within learned absolute positions.

    Either mistake would otherwise surface as a bare "index out of range in self" from
    inside the forward.
    """
    rows = getattr(input_embeddings(model), "num_embeddings", None)
    if isinstance(rows, int):
        top = max(max(row) for row in token_ids)
        if top >= rows:
            raise ValueError(
                f"tokenizer produced token id {top}, but the model's input embedding has {rows} rows: "
                "the tokenizer does not belong to this model"
            )
    positions = _learned_positions(model)
    longest = max(len(row) for row in token_ids)
    if positions is not None and longest > positions:
        raise ValueError(
            f"max_length={max_length} lets a text reach {longest} tokens, but the model has learned "
            f"absolute positions for {positions} tokens only; pass max_length <= {positions}"
        )


# Learned absolute position embeddings: GPT-2/GPT-J-style wpe, OPT embed_positions, ...
_POSITION_EMBEDDING_NAMES = ("wpe", "embed_positions", "position_embeddings")


def _learned_positions(model) -> int | None:
    """How many positions the model's learned position table covers, if it has one."""
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Embedding) and name.rsplit(".", 1)[-1] in _POSITION_EMBEDDING_NAMES:
            return module.num_embeddings - int(getattr(module, "offset", 0))  # OPT keeps 2 rows spare
    return None


def _make_vector(
    sums: np.ndarray, counts: np.ndarray, layer: int, behavior: str, model_name: str,
    token_position: str, num_pairs: int, batch_size: int, model, component: str,
) -> SteeringVector:
    with np.errstate(invalid="ignore", over="ignore"):  # non-finite sums: the error below says so
        pos_mean = sums[POSITIVE::2].sum(0) / counts[POSITIVE::2].sum()
        neg_mean = sums[NEGATIVE::2].sum(0) / counts[NEGATIVE::2].sum()
        difference = pos_mean - neg_mean
    if not (np.isfinite(pos_mean).all() and np.isfinite(neg_mean).all()):
        dtype = _model_dtype(model)
        hint = " or run it in a wider dtype (float32/bfloat16 instead of float16)" if dtype == "float16" else ""
        raise ValueError(
            f"activations at layer {layer} contain NaN or inf (model dtype {dtype}); no vector "
            f"was produced. Check the model weights{hint}"
        )
    vector_norm = float(np.linalg.norm(difference))
    unit = difference / vector_norm if vector_norm > 0 else difference
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
            "num_positive": int(counts[POSITIVE::2].sum()),
            "num_negative": int(counts[NEGATIVE::2].sum()),
            "cosine_pos_neg": _cosine(pos_mean, neg_mean),
            # where the two sides sit along the vector: operator="clamp" steers to the positive one
            "pos_mean_projection": float(pos_mean @ unit),
            "neg_mean_projection": float(neg_mean @ unit),
            "batch_size": batch_size,
            "model_dtype": _model_dtype(model),
            "component": component,
            "layer_semantics": _LAYER_SEMANTICS[component],
        },
    )


_LAYER_SEMANTICS = {
    "residual": "output of decoder block layer_index (hidden_states[layer_index + 1])",
    "mlp": "output of the feed-forward (MLP) submodule of decoder block layer_index",
    "attn": "output of the self-attention submodule of decoder block layer_index",
}


def _finite_or_none(value):
    """JSON has no NaN or inf: undefined figures are stored as null."""
    return value if not isinstance(value, float) or math.isfinite(value) else None


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    denominator = float(np.linalg.norm(a) * np.linalg.norm(b))
    return float(a @ b) / denominator if denominator > 0 and math.isfinite(denominator) else 0.0


def _model_dtype(model) -> str:
    parameter = next(model.parameters(), None)
    return str(parameter.dtype).removeprefix("torch.") if parameter is not None else "unknown"
