"""Shared prefixes: the tokens both texts of a pair begin with run once.

CAA's A/B items are identical up to the answer letter, chat pairs share the user turn. For
such a pair the common prefix runs once with a KV cache (stopped after the deepest hooked
block, like every extraction forward; for ``last`` / ``answer``, whose prefix rows nobody
reads, right after that block's cache write: ``_Dispatch.fill_cache``), then both suffixes
run as one batch against that cache, with explicit ``position_ids`` and a mask over
prefix + suffix. Each row is read once:

- ``last`` / ``answer``: the read token lies in the suffix (pairs where it does not go
  through the plain path), read from the suffix forward.
- ``first``: row 0 depends on token 0 alone (``caa.collect`` cuts every text to it), so each
  distinct first token runs once and its row counts for every text that begins with it: a
  pair whose texts begin alike has its row read once and counted for both sides; with a BOS
  token, one row serves the dataset. This needs no cache and no minimum length.
- ``mean``: per text (prefix sum + suffix sum) / (prefix length + suffix length). Both sums
  come from the C accumulator's masked mean on a scratch accumulator with one group per row
  (float64), times the row's token count; the combined per-text means are then added to the
  real accumulator as ``[rows, hidden]`` float64 rows, so counts and the separation sample
  see one row per text, as on the plain path.

Pairs also share their beginning with each other (a chat template's system prompt, a few-shot
preamble): the *stem*, the tokens every shared pair's prefix begins with, runs once for the
whole pass (batch 1); each prefix batch continues from its cache, expanded to the batch.

For ``last`` / ``answer`` / ``mean``, pairs whose common prefix is shorter than
``MIN_SHARED_TOKENS``, or where a suffix is empty or the read token lies in the prefix, and
models whose cache cannot be reused this way, go through ``forward.accumulate_batches``
unchanged. What was done is returned for the
vectors' metadata.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from .. import _core
from ..model_control import block_output, deepest_module, eval_mode, exclusive_use, forward_hooks, unflatten_rows
from .batching import make_batches, pad_right
from .forward import accumulate_batches

# Measured on SmolLM2-135M (CPU, 1 thread, batch_size=16, 48 pairs with ~8-token suffixes,
# shared/plain time over two runs): 2 tokens 0.87-1.03, 4 tokens 0.76-0.90, 8 tokens 0.67-0.91,
# 32 tokens 0.58-0.69. Below 4 the extra forward and the cache copy eat the saving.
MIN_SHARED_TOKENS = 4


@dataclass
class _Shared:
    pair: int       # index k: rows k (positive) and k + num_pairs (negative) of token_ids
    prefix: int     # common prefix length in tokens


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    k = 0
    while k < n and a[k] == b[k]:
        k += 1
    return k


def plan_pairs(token_ids: Sequence[Sequence[int]], rows: Sequence[int], num_pairs: int, token_position: str,
               read_indices: Sequence[int] | None, min_tokens: int) -> tuple[list[_Shared], list[int]]:
    """Split ``rows`` (indices into ``token_ids``; pair k is rows k and k + num_pairs) into
    pairs that share a prefix and rows for the plain path."""
    present = set(rows)
    shared, rest = [], []
    for k in sorted({r % num_pairs for r in rows}):
        pos, neg = k, k + num_pairs
        if pos not in present or neg not in present:
            rest.extend(r for r in (pos, neg) if r in present)
            continue
        a, b = token_ids[pos], token_ids[neg]
        length = common_prefix_length(a, b)
        ok = length >= min_tokens and length < len(a) and length < len(b)  # both suffixes non-empty
        if ok and token_position == "answer":
            ok = read_indices[pos] >= length and read_indices[neg] >= length
        if ok:
            shared.append(_Shared(k, length))
        else:
            rest.extend((pos, neg))
    return shared, sorted(rest)


def stem_length(token_ids: Sequence[Sequence[int]], shared: Sequence[_Shared], minimum: int) -> int:
    """Tokens every shared pair's prefix begins with, one short of the shortest prefix (each
    prefix batch keeps a token of its own), or 0 when under ``minimum`` or fewer than 2 pairs."""
    if len(shared) < 2:
        return 0
    first = token_ids[shared[0].pair]
    length = min(s.prefix for s in shared) - 1
    for s in shared[1:]:
        length = min(length, common_prefix_length(first[:length], token_ids[s.pair][:length]))
        if length < minimum:
            return 0
    return length


def _cache_keyword(model: nn.Module) -> str | None:
    """The forward's cache argument (transformers 5 renamed past_key_values to cache)."""
    try:
        parameters = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return None
    if "position_ids" not in parameters or "attention_mask" not in parameters:
        return None
    for name in ("cache", "past_key_values"):
        if name in parameters:
            return name
    return None


def _new_cache(model: nn.Module):
    """A DynamicCache whose every layer is a plain growing one, or the reason there is none."""
    try:
        from transformers import DynamicCache
        from transformers.cache_utils import DynamicLayer
    except ImportError:
        return None, "transformers has no DynamicCache"
    config = getattr(model, "config", None)
    if config is None or getattr(config, "is_encoder_decoder", False):
        return None, "not a decoder-only HuggingFace model"
    try:
        cache = DynamicCache(config=config)
    except Exception as error:  # noqa: BLE001 - any model-specific refusal means: plain path
        return None, f"DynamicCache(config) failed: {type(error).__name__}"
    if not all(hasattr(layer, "is_initialized") for layer in cache.layers):
        import transformers  # older cache layers (4.x) do not say which layers ran

        return None, f"transformers {transformers.__version__}: cache layers without is_initialized"
    kinds = {type(layer).__name__ for layer in cache.layers if type(layer) is not DynamicLayer}
    if kinds:
        # Sliding-window or linear-attention layers keep state the prefix copy would not carry.
        return None, f"cache layers {sorted(kinds)} cannot be shared"
    return cache, None


def fallback_reason(model: nn.Module, reduce_on: str, distributed: bool, needs_cache: bool = True) -> str | None:
    """Why this model / run cannot share prefixes (None: it can)."""
    if distributed:
        return "distributed run"
    if reduce_on == "device":
        return "reduce_on='device'"
    if any(p.device.type != "cpu" for p in model.parameters()):
        return "model not on the CPU"
    if not needs_cache:
        return None
    if _cache_keyword(model) is None:
        return "forward takes no cache / position_ids"
    return _new_cache(model)[1]


def not_shared(reason: str) -> dict:
    """The metadata of a pass that shared no prefix, and why."""
    return {"shared_prefix": False, "shared_prefix_pairs": 0, "shared_prefix_stem_tokens": 0,
            "shared_prefix_tokens_saved": 0, "shared_prefix_fallback": reason}


def tokens_saved(token_ids: Sequence[Sequence[int]], shared: Sequence[_Shared], num_pairs: int, stem: int) -> int:
    """Tokens the plain path would run for the shared pairs that the shared path does not."""
    # each pair's prefix once instead of twice, the stem once instead of once per pair
    return sum(s.prefix for s in shared) + (len(shared) - 1) * stem if shared else 0


def accumulate(model: nn.Module, modules: Sequence[nn.Module], token_ids: Sequence[Sequence[int]],
               row_groups: Sequence[int], read_indices: Sequence[int] | None, rows: Sequence[int],
               token_position: str, batch_size: int, pad_id: int | None, accumulator: _core.Accumulator,
               on_rows: Callable[[int], None], unflatten: bool, reduce_on: str, share_prefix: bool | None,
               distributed: bool):
    """Everything ``caa._extract`` runs for ``rows``: shared pairs here, the rest through
    ``accumulate_batches``. Returns (DeviceReducer or None, metadata dict)."""
    num_pairs = len(token_ids) // 2
    first = token_position == "first"  # one token per text: no cache involved
    reason = ("share_prefix=False" if share_prefix is False
              else fallback_reason(model, reduce_on, distributed, needs_cache=not first))
    if reason is None and first:
        return None, _run_first_tokens(model, modules, token_ids, row_groups, rows, num_pairs, batch_size,
                                       accumulator, on_rows, unflatten)
    if reason is None and pad_id is None:
        reason = "tokenizer has no pad or eos token"  # the plain path says what to do about it
    shared: list[_Shared] = []
    rest = list(rows)
    stem = 0
    if reason is None:
        # share_prefix=True: every pair with any common prefix (still not where the model cannot).
        minimum = 1 if share_prefix is True else MIN_SHARED_TOKENS
        shared, rest = plan_pairs(token_ids, rows, num_pairs, token_position, read_indices, minimum)
        if not shared:
            reason = f"no pair shares a prefix of >= {minimum} tokens before the read token"
        else:
            stem = stem_length(token_ids, shared, minimum)
    info = {"shared_prefix": bool(shared), "shared_prefix_pairs": len(shared), "shared_prefix_stem_tokens": stem,
            "shared_prefix_tokens_saved": tokens_saved(token_ids, shared, num_pairs, stem),
            "shared_prefix_fallback": reason}
    if shared:
        _run_shared(model, modules, token_ids, row_groups, read_indices, shared, num_pairs, token_position,
                    batch_size, pad_id, accumulator, on_rows, unflatten, stem)
    reducer = None
    if rest:
        batches = make_batches([token_ids[i] for i in rest], [row_groups[i] for i in rest], token_position,
                               batch_size, pad_id, None if read_indices is None else [read_indices[i] for i in rest])
        reducer = accumulate_batches(model, modules, batches, accumulator,
                                     on_batch=lambda batch: on_rows(batch.num_rows), unflatten=unflatten,
                                     reduce_on=reduce_on, total_rows=len(rest))
    return reducer, info


def _run_first_tokens(model, modules, token_ids, row_groups, rows: Sequence[int], num_pairs: int, batch_size: int,
                      accumulator: _core.Accumulator, on_rows, unflatten: bool) -> dict:
    """``first``: each distinct first token once (one token at position 0), its row added to
    the group of every text that begins with it. Returns the metadata."""
    texts_of: dict[int, list[int]] = {}
    for row in rows:
        texts_of.setdefault(token_ids[row][0], []).append(row)
    tokens = list(texts_of)
    dispatch = _Dispatch(len(modules), deepest_module(model, modules), unflatten)
    hooks = [(module, dispatch.hook(slot)) for slot, module in enumerate(modules)]
    with exclusive_use(model), eval_mode(model), forward_hooks(hooks), torch.inference_mode():
        for start in range(0, len(tokens), batch_size):
            chunk = tokens[start:start + batch_size]
            texts = [row for token in chunk for row in texts_of[token]]
            owner = torch.as_tensor([j for j, token in enumerate(chunk) for _ in texts_of[token]], dtype=torch.long)
            groups = torch.as_tensor([row_groups[row] for row in texts], dtype=torch.long)
            ids = torch.as_tensor(chunk, dtype=torch.long)[:, None]

            def read(slot, hidden):
                first = hidden[:, 0]
                for at in range(0, len(texts), batch_size):  # at most batch_size rows at a time, as elsewhere
                    accumulator.add(slot, first.index_select(0, owner[at:at + batch_size]),
                                    groups[at:at + batch_size])

            # One token, empty cache: every model puts it at position 0 unasked.
            dispatch.run(model, len(chunk), read, input_ids=ids, attention_mask=torch.ones_like(ids),
                         use_cache=False)
            on_rows(len(texts))
    present = set(rows)
    pairs = sum(1 for k in range(num_pairs) if k in present and k + num_pairs in present
                and token_ids[k][0] == token_ids[k + num_pairs][0])
    saved = len(rows) - len(tokens)
    return {"shared_prefix": saved > 0, "shared_prefix_pairs": pairs, "shared_prefix_stem_tokens": 0,
            "shared_prefix_tokens_saved": saved,
            "shared_prefix_fallback": None if saved else "no two texts begin with the same token"}


class _Dispatch:
    """Forward hooks that hand each hooked output to the current forward's reader; the
    deepest raises StopForward (its block is the last one the cache needs)."""

    def __init__(self, count: int, deepest: int, unflatten: bool) -> None:
        self.reader: Callable[[int, torch.Tensor], None] = lambda slot, hidden: None
        self.rows = 0
        self.calls = [0] * count
        self.deepest, self.unflatten = deepest, unflatten
        self.last_cache_layer: int | None = None  # the last cache layer a full forward writes

    def hook(self, slot: int):
        def capture(module, args, output):
            self.calls[slot] += 1
            if self.unflatten:
                output = unflatten_rows(output, self.rows)
            self.reader(slot, block_output(output))
            if slot == self.deepest:
                raise _core.StopForward
        return capture

    def run(self, model: nn.Module, rows: int, reader, **inputs) -> None:
        self.reader, self.rows = reader, rows
        before = list(self.calls)
        try:
            model(**inputs)
        except _core.StopForward:
            pass
        missed = [slot for slot, (now, then) in enumerate(zip(self.calls, before)) if now != then + 1]
        if missed:
            raise RuntimeError(
                f"hooked block(s) at slot(s) {missed} did not run exactly once in the forward; "
                "the block list does not match how this model executes (pass layer_modules=...)"
            )

    def fill_cache(self, model: nn.Module, rows: int, kv_cache, /, **inputs) -> None:
        """A forward for its cache alone (nobody reads its rows). After the last cache write
        the deepest hooked block only makes rows nobody reads (its attention output and MLP),
        so once a full forward has shown which layer that write goes to, later forwards stop
        right after it."""
        nothing = lambda slot, hidden: None  # noqa: E731
        if self.last_cache_layer is None or self.last_cache_layer < 0:
            self.run(model, rows, nothing, **inputs)
            if self.last_cache_layer is None:
                # -1: the deepest hooked module runs before any attention (layer_modules=...): no stop
                self.last_cache_layer = max(
                    (i for i, layer in enumerate(kv_cache.layers) if layer.is_initialized), default=-1)
            return
        layer = kv_cache.layers[self.last_cache_layer]
        written = []

        def update(*args, **kwargs):
            written.append(type(layer).update(layer, *args, **kwargs))
            raise _core.StopForward

        self.reader, self.rows = nothing, rows
        layer.update = update
        try:
            model(**inputs)
        except _core.StopForward:
            pass
        finally:
            del layer.update
        lengths = {c.keys.shape[-2] for c in kv_cache.layers[:self.last_cache_layer + 1] if c.is_initialized}
        if not written or len(lengths) != 1:
            raise RuntimeError(f"cache layer {self.last_cache_layer} was not written last "
                               f"(written: {bool(written)}, lengths {sorted(lengths)}); pass share_prefix=False")


def _read_means(model, dispatch: _Dispatch, scratch: _core.Accumulator, mask: torch.Tensor, **inputs) -> np.ndarray:
    """Run a forward and return [slots, rows, hidden] float64: each row's mean over the tokens
    ``mask`` marks (the C accumulator's masked mean, one scratch group a row)."""
    rows = mask.shape[0]
    every_row = torch.arange(rows, dtype=torch.long)
    scratch.reset()
    dispatch.run(model, rows, lambda slot, hidden: scratch.add(slot, hidden, every_row, mask=mask), **inputs)
    return scratch.state()[0][:, :rows].copy()


def _pooled_mean(mean_a: np.ndarray, count_a, mean_b: np.ndarray, count_b) -> np.ndarray:
    """The mean over two sets of rows, from each set's mean and row count."""
    return (mean_a * count_a + mean_b * count_b) / (count_a + count_b)


@dataclass
class _Stem:
    """The stem's cache (per cache layer (keys, values) of batch 1, None past the deepest
    hooked block) and, for ``mean``, its per-slot row means."""
    length: int
    cache: object
    kv: list
    means: np.ndarray | None

    def cache_for(self, count: int):
        """The shared cache object, holding the stem expanded (not copied) to ``count`` rows."""
        for layer, kv in zip(self.cache.layers, self.kv):
            if kv is not None:
                layer.keys, layer.values = (t.expand(count, -1, -1, -1) for t in kv)
        return self.cache


def _run_stem(model, dispatch: "_Dispatch", cache_keyword: str, ids: Sequence[int], scratch) -> _Stem:
    cache, _ = _new_cache(model)
    input_ids = torch.as_tensor([list(ids)], dtype=torch.long)
    mask = torch.ones_like(input_ids)
    inputs = dict(input_ids=input_ids, attention_mask=mask, position_ids=torch.arange(len(ids))[None],
                  use_cache=True, **{cache_keyword: cache})
    means = None
    if scratch is not None:  # mean: the stem's rows are read
        means = _read_means(model, dispatch, scratch, mask, **inputs)[:, 0]
    else:
        dispatch.fill_cache(model, 1, cache, **inputs)
    kv = [(layer.keys, layer.values) if layer.is_initialized else None for layer in cache.layers]
    return _Stem(len(ids), cache, kv, means)


def _run_shared(model, modules, token_ids, row_groups, read_indices, shared: list[_Shared], num_pairs: int,
                token_position: str, batch_size: int, pad_id: int | None, accumulator: _core.Accumulator,
                on_rows, unflatten: bool, stem_tokens: int) -> None:
    cache_keyword = _cache_keyword(model)
    slots = len(modules)
    dispatch = _Dispatch(slots, deepest_module(model, modules), unflatten)
    # Suffix rows per forward: batch_size, but a pair's two suffixes always together.
    suffix_rows = max(batch_size, 2)
    scratch = _core.Accumulator(slots, accumulator.hidden, suffix_rows) if token_position == "mean" else None
    order = sorted(shared, key=lambda s: -s.prefix)  # longest first: memory peaks on the first batch
    hooks = [(module, dispatch.hook(slot)) for slot, module in enumerate(modules)]
    with exclusive_use(model), eval_mode(model), forward_hooks(hooks), torch.inference_mode():
        stem = (_run_stem(model, dispatch, cache_keyword, token_ids[shared[0].pair][:stem_tokens], scratch)
                if stem_tokens else None)
        for start in range(0, len(order), batch_size):
            group = order[start:start + batch_size]
            _run_prefix_batch(model, dispatch, cache_keyword, group, token_ids, row_groups, read_indices,
                              num_pairs, token_position, pad_id, suffix_rows, accumulator, scratch, stem)
            on_rows(2 * len(group))


def _run_prefix_batch(model, dispatch: _Dispatch, cache_keyword: str, group: list[_Shared], token_ids,
                      row_groups, read_indices, num_pairs: int, token_position: str, pad: int,
                      suffix_rows: int, accumulator: _core.Accumulator, scratch, stem: _Stem | None) -> None:
    # The prefix past the stem (at least one token each: stem_length leaves one).
    skip = stem.length if stem is not None else 0
    prefix_lengths = torch.as_tensor([s.prefix for s in group], dtype=torch.long)
    prefix_ids, own_mask = pad_right([token_ids[s.pair][skip:s.prefix] for s in group], pad)
    count, width = prefix_ids.shape
    positions = skip + torch.arange(width).expand(count, width)
    prefix_mask = torch.cat([torch.ones((count, skip), dtype=torch.long), own_mask], dim=1)

    cache = stem.cache_for(count) if stem is not None else _new_cache(model)[0]
    inputs = dict(input_ids=prefix_ids, attention_mask=prefix_mask, position_ids=positions, use_cache=True,
                  **{cache_keyword: cache})
    prefix_means = None
    if scratch is not None:  # mean: the prefix rows are read
        prefix_means = _read_means(model, dispatch, scratch, own_mask, **inputs)
        if stem is not None:  # the stem's rows belong to every prefix
            own = own_mask.sum(1).numpy().astype(np.float64)[:, None]
            prefix_means = _pooled_mean(stem.means[:, None], stem.length, prefix_means, own)
    else:
        dispatch.fill_cache(model, count, cache, **inputs)
    # Only the layers up to the deepest hooked block ran; those are all the suffixes need.
    saved = [(layer.keys, layer.values) if layer.is_initialized else None for layer in cache.layers]

    # Both suffixes of every pair, bucketed by length.
    suffixes = [(j, side) for j in range(count) for side in (0, 1)]
    row_of = lambda j, side: group[j].pair + side * num_pairs  # noqa: E731
    suffixes.sort(key=lambda js: -(len(token_ids[row_of(*js)]) - group[js[0]].prefix))
    for start in range(0, len(suffixes), suffix_rows):
        chunk = suffixes[start:start + suffix_rows]
        owners = torch.as_tensor([j for j, _ in chunk], dtype=torch.long)
        rows = [row_of(j, side) for j, side in chunk]
        ids, mask = pad_right([token_ids[r][group[j].prefix:] for r, (j, _) in zip(rows, chunk)], pad)
        n, length = ids.shape
        offsets = prefix_lengths[owners]
        for layer, kv in zip(cache.layers, saved):
            if kv is not None:
                layer.keys, layer.values = kv[0].index_select(0, owners), kv[1].index_select(0, owners)
        groups = torch.as_tensor([row_groups[r] for r in rows], dtype=torch.long)
        inputs = dict(input_ids=ids, attention_mask=torch.cat([prefix_mask[owners], mask], dim=1),
                      position_ids=offsets[:, None] + torch.arange(length), use_cache=True,
                      **{cache_keyword: cache})
        if scratch is None:
            if token_position == "last":
                index = mask.sum(1) - 1
            else:  # "answer": the token index within the suffix
                index = torch.as_tensor([read_indices[r] for r in rows], dtype=torch.long) - offsets
            dispatch.run(model, n, lambda slot, hidden: accumulator.add(slot, hidden, groups, index=index), **inputs)
            continue
        suffix_means = _read_means(model, dispatch, scratch, mask, **inputs)
        combined = _pooled_mean(prefix_means[:, owners.numpy()], offsets.numpy().astype(np.float64)[:, None],
                                suffix_means, mask.sum(1).numpy().astype(np.float64)[:, None])
        for slot in range(combined.shape[0]):
            accumulator.add(slot, combined[slot], groups)
