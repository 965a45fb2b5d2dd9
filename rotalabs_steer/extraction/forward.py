"""The extraction forward loop: one batched forward per batch, hooks on the requested
blocks, early stop, clean exit.

The C CaptureHook on each requested block feeds the block output to the Accumulator
in place; the hook on the deepest block raises StopForward, so later blocks and the
LM head never run. Whatever happens (an error inside the forward, KeyboardInterrupt),
the hooks come off and every module's ``training`` flag is restored.
"""

from __future__ import annotations

from typing import Callable, Iterable, Sequence

import torch
from torch import nn

from .. import _core
from ..model_control import (block_output, deepest_module, eval_mode, exclusive_use, forward_hooks,
                             input_device, unflatten_rows)
from .batching import TokenBatch
from .device_reduce import BatchRows, DeviceReducer, to_device


class _DeviceCapture:
    """The Python twin of CaptureHook for ``reduce_on="device"``: every output goes to the
    DeviceReducer, whatever device holds it; the deepest one ends the forward."""

    def __init__(self, reducer: DeviceReducer, slot: int, stop: bool) -> None:
        self.reducer, self.slot, self.stop, self.calls = reducer, slot, stop, 0

    def __call__(self, module: nn.Module, args: tuple, output) -> None:
        self.calls += 1
        self.reducer(self.slot, block_output(output))
        if self.stop:
            raise _core.StopForward


class PairMomentHooks:
    """Forward hooks feeding the second moments of paired differences (``_core.PairMoments``).

    Each hooked module's selected rows (as ``BatchRows.select`` picks them) are
    matched with their pair partners and handed to ``PairMoments.add``, which forms the
    differences and updates the moments in C. Rows are ordered with partners adjacent
    (``batching.pair_order``), so a row whose partner is in the next batch waits here: at
    most one row per layer at a time.
    """

    def __init__(self, moments: _core.PairMoments, partner: Sequence[int], is_positive: Sequence[bool]) -> None:
        self.moments, self.partner, self.is_positive = moments, partner, is_positive
        self.rows = BatchRows()
        self.waiting: list[dict[int, torch.Tensor]] = [{} for _ in range(moments.num_slots)]

    def begin(self, batch: TokenBatch) -> None:
        self.rows.begin(batch)

    def hook(self, slot: int) -> Callable:
        def add_pairs(module: nn.Module, args: tuple, output) -> None:
            batch = self.rows.batch
            hidden = block_output(unflatten_rows(output, batch.num_rows))
            rows = self.rows.select(hidden).cpu()  # the moments are summed in C, on the host
            waiting, extra, pos, neg = self.waiting[slot], [], [], []
            for r, row_id in enumerate(batch.row_ids.tolist()):
                partner = self.partner[row_id]
                if partner in waiting:
                    extra.append(waiting.pop(partner))
                    other = batch.num_rows + len(extra) - 1
                    pos.append(r if self.is_positive[row_id] else other)
                    neg.append(other if self.is_positive[row_id] else r)
                else:
                    waiting[row_id] = rows[r].clone()
            if pos:
                self.moments.add(slot, torch.cat([rows, *[e[None] for e in extra]]) if extra else rows,
                                 torch.tensor(pos), torch.tensor(neg))
        return add_pairs

    def check_complete(self) -> None:
        if any(self.waiting):
            raise RuntimeError("internal error: some pair members never met their partner")


class _Unflattening:
    """Passes 2-D ``[batch * seq, hidden]`` outputs on to a capture hook as ``[batch, seq, hidden]``."""

    def __init__(self, hook, accumulator: _core.Accumulator) -> None:
        self.hook, self.accumulator = hook, accumulator

    def __call__(self, module: nn.Module, args: tuple, output):
        return self.hook(module, args, unflatten_rows(output, self.accumulator.batch_rows))


REDUCE_ON = ("auto", "host", "device")


def accumulate_batches(
    model: nn.Module,
    blocks: Sequence[nn.Module],
    batches: Iterable[TokenBatch],
    accumulator: _core.Accumulator,
    on_batch: Callable[[TokenBatch], None] | None = None,
    unflatten: bool = False,
    reduce_on: str = "auto",
    total_rows: int = 0,
    moments: PairMomentHooks | None = None,
) -> DeviceReducer:
    """Run every batch through ``model``, adding outputs of ``blocks[slot]`` to ``slot``.

    ``reduce_on``: ``"auto"`` reduces host tensors in C and others on their device;
    ``"host"`` reduces in C only (a tensor the CPU cannot read is an error); ``"device"`` reduces
    every tensor with torch on its own device, host tensors included. Device sums are merged
    into ``accumulator`` at the end. ``total_rows``: rows in all batches, for choosing the
    device path's separation sample ahead. ``unflatten``: the hooked modules may return
    ``[batch * seq, hidden]`` (OPT's MLP does); view such outputs as ``[batch, seq, hidden]``.
    ``moments``: also feed second moments of the paired differences (rows must come in
    ``pair_order``). Returns the DeviceReducer (its ``samples(slot)`` for slots reduced on a device).
    """
    device = input_device(model)
    deepest = deepest_module(model, blocks)
    reducer = DeviceReducer(len(blocks), accumulator.num_groups, accumulator.hidden, total_rows,
                            accumulator.sample_rows)
    if reduce_on == "device":
        hooks = [_DeviceCapture(reducer, slot, slot == deepest) for slot in range(len(blocks))]
    else:  # C for what the CPU can read; "auto" hands an accelerator's tensors to the reducer
        device_rows = reducer if reduce_on == "auto" else None
        hooks = [_core.CaptureHook(accumulator, slot, stop=slot == deepest, device_rows=device_rows)
                 for slot in range(len(blocks))]
    callables = [_Unflattening(hook, accumulator) for hook in hooks] if unflatten else hooks
    # The moment hooks go first: the deepest capture hook ends the forward by raising.
    pairs = list(zip(blocks, callables))
    if moments is not None:
        pairs = [(block, moments.hook(slot)) for slot, block in enumerate(blocks)] + pairs
    with exclusive_use(model), eval_mode(model), forward_hooks(pairs), torch.inference_mode():
        try:
            for batch in batches:
                if moments is not None:
                    moments.begin(batch)
                _run_batch(model, batch, device, accumulator, hooks, reducer)
                if on_batch is not None:
                    on_batch(batch)
        finally:
            accumulator.clear_batch()
    if moments is not None:
        moments.check_complete()
    reducer.merge_into(accumulator)
    return reducer


def _run_batch(
    model: nn.Module,
    batch: TokenBatch,
    device: torch.device,
    accumulator: _core.Accumulator,
    hooks: Sequence,
    reducer: DeviceReducer,
) -> None:
    if batch.read_index is not None:
        accumulator.set_batch(batch.groups, index=batch.read_index)
    else:
        accumulator.set_batch(batch.groups, mask=batch.attention_mask)
    reducer.begin(batch)
    calls_before = [hook.calls for hook in hooks]
    try:
        model(
            input_ids=to_device(batch.input_ids, device),
            attention_mask=to_device(batch.attention_mask, device),
            use_cache=False,
        )
    except _core.StopForward:
        pass
    missed = [h.slot for h, before in zip(hooks, calls_before) if h.calls != before + 1]
    if missed:
        raise RuntimeError(
            f"hooked block(s) at slot(s) {missed} did not run exactly once in the forward; "
            "the block list does not match how this model executes (pass layer_modules=...)"
        )
