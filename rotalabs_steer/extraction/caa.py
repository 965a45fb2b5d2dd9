"""Contrastive Activation Addition: vector = mean(positive rows) - mean(negative rows).

All requested layers share one forward per batch; positive and negative texts share
batches (bucketed by length); the forward stops after the deepest requested block.
Sums are float64 in the C accumulator, so the result does not depend on batch size,
padding or pair order beyond float32 round-off of the model itself.
"""

from __future__ import annotations

from typing import Literal, Sequence

import torch

from .. import _core
from ..datasets.base import ContrastPairDataset, as_contrast_pairs
from ..layers import COMPONENTS, component_module, find_decoder_blocks, hidden_size_of, resolve_layer_indices
from ..model_control import input_embeddings
from ..progress import progress_bar
from ..validation import as_int, check_choice, int_at_least, layer_in_range
from ..vectors import SteeringVector, SteeringVectorSet
from .batching import NEGATIVE, POSITIVE, TOKEN_POSITIONS, make_batches, pad_token_id, pair_order, tokenize
from .distributed import (all_reduce_moments, all_reduce_state, gather_samples, rank_and_size, resolve_group,
                          share_of_rows)
from . import shared_prefix
from .forward import REDUCE_ON, PairMomentHooks, accumulate_batches
from .separation import DEFAULT_FOLDS, fold_of_pairs
from .methods import DEFAULT_SHRINKAGE
from .statistics import METHODS, PairStatistics

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


def collect_pair_statistics(
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
) -> PairStatistics:
    """One pass over the pairs collecting what every extraction method needs, per layer.

    Besides CAA's sums, accumulates (float64, in C) the count, sum and second moment
    sum d d^T of the paired differences d = row(positive) - row(negative): memory
    O(layers x hidden^2), independent of the number of pairs. Then
    ``stats.vectors("caa" | "pca" | "pca_diff" | "fisher")``; ``stats_a + stats_b`` merges
    two pair sets; ``save``/``PairStatistics.load`` keep them. Keywords are those of
    ``extract_caa_vectors``.
    """
    return collect(model, tokenizer, contrast_pairs, layer_indices, token_position, show_progress,
                   batch_size, max_length, layer_modules, separation_sample, component, process_group,
                   reduce_on, second_moments=True)


def extract_vectors(
    model,
    tokenizer,
    contrast_pairs: ContrastPairDataset | list[dict],
    layer_indices: Sequence[int],
    method: str = "caa",
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
    shrinkage: float = DEFAULT_SHRINKAGE,
) -> SteeringVectorSet:
    """Steering vectors by ``method``: ``"caa"`` (mean difference, as ``extract_caa_vectors``),
    ``"pca"`` (top eigenvector of sum d d^T), ``"pca_diff"`` (top eigenvector of the covariance
    of the differences) or ``"fisher"`` ((C + eps I)^-1 mean(d), eps = shrinkage * trace(C) / H).

    Directions are unit-norm, signed so that they point from negative to positive; their
    ``metadata["caa_projection"]`` is the CAA vector's length along them. Other keywords are
    those of ``extract_caa_vectors``. To get several methods from one pass, use
    ``collect_pair_statistics(...).vectors(method)``.
    """
    check_choice(method, METHODS, "method")
    arguments = (model, tokenizer, contrast_pairs, layer_indices, token_position, show_progress,
                 batch_size, max_length, layer_modules, separation_sample, component, process_group, reduce_on)
    if method == "caa":  # exactly extract_caa_vectors' pass, prefixes shared where it pays
        return collect(*arguments, share_prefix=None).vectors("caa")
    options = {"shrinkage": shrinkage} if method == "fisher" else {}
    return collect(*arguments, second_moments=True).vectors(method, **options)


def _extract(model, tokenizer, contrast_pairs, layer_indices: int | Sequence[int], token_position,
             show_progress, batch_size, max_length, layer_modules, separation_sample,
             component, process_group, reduce_on, share_prefix=None, single_layer: bool = False
             ) -> SteeringVectorSet:
    """``single_layer``: ``layer_indices`` is ``extract_caa_vector``'s one ``layer_idx``."""
    return collect(model, tokenizer, contrast_pairs, layer_indices, token_position, show_progress,
                   batch_size, max_length, layer_modules, separation_sample, component, process_group,
                   reduce_on, single_layer=single_layer, share_prefix=share_prefix).vectors("caa")


def collect(model, tokenizer, contrast_pairs, layer_indices: int | Sequence[int], token_position,
            show_progress, batch_size, max_length, layer_modules, separation_sample,
            component, process_group, reduce_on: str = "auto", single_layer: bool = False,
            second_moments: bool = False, share_prefix: bool | None = False) -> PairStatistics:
    """One pass over the pairs: the statistics every method is made from.

    ``second_moments``: also the moments of the paired differences (pairs then share
    batches, see ``batching.pair_order``); without them this is exactly the CAA pass, with
    ``share_prefix`` as ``extract_caa_vectors`` takes it (the moment pass never shares prefixes).
    """
    check_choice(token_position, TOKEN_POSITIONS, "token_position")
    check_choice(component, COMPONENTS, "component")
    check_choice(reduce_on, REDUCE_ON, "reduce_on")
    if share_prefix not in (None, True, False):
        raise TypeError(f"share_prefix must be None, True or False, got {share_prefix!r}")
    batch_size = int_at_least(batch_size, "batch_size", 1)
    max_length = int_at_least(max_length, "max_length", 1)
    separation_sample = int_at_least(separation_sample, "separation_sample", 0)
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
    # Attention is causal: tokens after the one read cannot change it, so they never run.
    if token_position == "first":
        token_ids = [row[:1] for row in token_ids]
    elif token_position == "answer":
        token_ids = [row[:read + 1] for row, read in zip(token_ids, read_indices)]
    modules = [component_module(blocks.modules[i], component)[0] for i in layers]

    ranks = resolve_group(process_group)
    rank, world_size = rank_and_size(ranks)
    n = len(pairs)
    if second_moments:  # a rank takes whole pairs
        mine_pairs = share_of_rows([max(len(token_ids[i]), len(token_ids[i + n])) for i in range(n)], ranks)
        mine = mine_pairs + [i + n for i in mine_pairs]
    else:
        mine = share_of_rows([len(row) for row in token_ids], ranks)
    mine_ids = [token_ids[i] for i in mine]
    if second_moments:
        half = len(mine) // 2
        partner = [k + half if k < half else k - half for k in range(len(mine))]
        order = pair_order(mine_ids, partner)
        moments = _core.PairMoments(len(layers), hidden)
        moment_hooks = PairMomentHooks(moments, partner, [k < half for k in range(len(mine))])
        batches = make_batches(mine_ids, [row_groups[i] for i in mine], token_position,
                               batch_size, pad_token_id(tokenizer),
                               None if read_indices is None else [read_indices[i] for i in mine], order)

    accumulator = _core.Accumulator(len(layers), hidden, 2 * folds,
                                    sample_rows=separation_sample if folds > 1 else 0)
    show_progress = show_progress and rank == 0
    what = "pair statistics" if second_moments else "CAA"
    reducer, prefix_info = None, {}
    with progress_bar(total=len(mine), unit="text", desc=f"{what} layers {layers}", show=show_progress) as bar:
        if mine and second_moments:
            prefix_info = shared_prefix.not_shared("pair statistics run both texts of a pair in full")
            reducer = accumulate_batches(model, modules, batches, accumulator,
                                         on_batch=lambda batch: bar.update(batch.num_rows),
                                         unflatten=component != "residual", reduce_on=reduce_on,
                                         total_rows=len(mine), moments=moment_hooks)
        elif mine:
            reducer, prefix_info = shared_prefix.accumulate(
                model, modules, token_ids, row_groups, read_indices, mine, token_position, batch_size,
                pad_token_id(tokenizer), accumulator, bar.update, component != "residual", reduce_on,
                share_prefix, distributed=ranks is not None)
    if ranks is not None:
        all_reduce_state(accumulator, ranks)
        if second_moments:
            all_reduce_moments(moments, ranks)

    sums, counts = accumulator.state()
    samples = []
    if accumulator.sample_rows:
        for slot in range(len(layers)):
            sample = (reducer and reducer.samples(slot)) or accumulator.samples(slot)
            samples.append(gather_samples(*sample, ranks) if ranks is not None else sample)
    info = {"batch_size": batch_size, "model_dtype": _model_dtype(model), "component": component,
            **prefix_info}
    if ranks is not None:
        info["world_size"] = world_size
    statistics = PairStatistics(
        layers=layers, behavior=behavior,
        model_name=getattr(getattr(model, "config", None), "_name_or_path", "") or "unknown",
        token_position=token_position, num_pairs=len(pairs), fold_sums=sums, fold_counts=counts,
        samples=samples, sample_rows=accumulator.sample_rows, info=info,
    )
    if second_moments:
        statistics.pair_counts, statistics.difference_sums, statistics.moments = moments.state()
    return statistics


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


def _model_dtype(model) -> str:
    parameter = next(model.parameters(), None)
    return str(parameter.dtype).removeprefix("torch.") if parameter is not None else "unknown"
