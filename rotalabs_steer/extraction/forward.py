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
from ..model_control import block_output, deepest_module, unflatten_rows, eval_mode, exclusive_use, forward_hooks, input_device
from .batching import TokenBatch


class DeviceRowCollector:
    """Row selection on an accelerator: only [batch, hidden] rows cross to the host.

    Called by CaptureHook for tensors the CPU cannot read. Rows of every hooked layer
    stay on the device until ``flush``, which moves them with one transfer per device.
    """

    def __init__(self) -> None:
        self._index: dict[torch.device, torch.Tensor] = {}
        self._mask: dict[torch.device, torch.Tensor] = {}
        self._batch: TokenBatch | None = None
        self._rows: dict[int, torch.Tensor] = {}

    def begin(self, batch: TokenBatch) -> None:
        self._batch, self._index, self._mask, self._rows = batch, {}, {}, {}

    @property
    def batch(self) -> TokenBatch | None:
        return self._batch

    def _on(self, device: torch.device, cache: dict, source: torch.Tensor) -> torch.Tensor:
        if device not in cache:
            cache[device] = source.to(device, non_blocking=True)
        return cache[device]

    def select(self, hidden: torch.Tensor) -> torch.Tensor:
        """The batch's selected rows of ``hidden`` ([batch, seq, hidden]), float32 [batch, hidden],
        on ``hidden``'s device: the read token of each row, or the mean over its real tokens."""
        batch = self._batch
        if batch.read_index is not None:
            index = self._on(hidden.device, self._index, batch.read_index)
            return hidden[torch.arange(hidden.shape[0], device=hidden.device), index].float()
        mask = self._on(hidden.device, self._mask, batch.attention_mask).to(torch.float32)
        return torch.einsum("bs,bsh->bh", mask, hidden.float()) / mask.sum(1, keepdim=True)

    def __call__(self, slot: int, hidden: torch.Tensor) -> None:
        self._rows[slot] = self.select(hidden)

    def flush(self, accumulator: _core.Accumulator) -> None:
        by_device: dict[torch.device, list[int]] = {}
        for slot, rows in self._rows.items():
            by_device.setdefault(rows.device, []).append(slot)
        for slots in by_device.values():
            host = torch.stack([self._rows[s] for s in slots]).to("cpu")  # the one sync
            for k, slot in enumerate(slots):
                accumulator.add(slot, host[k], self._batch.groups)
        self._rows = {}


class PairMomentHooks:
    """Forward hooks feeding the second moments of paired differences (``_core.PairMoments``).

    Each hooked module's selected rows (as ``DeviceRowCollector.select`` picks them) are
    matched with their pair partners and handed to ``PairMoments.add``, which forms the
    differences and updates the moments in C. Rows are ordered with partners adjacent
    (``batching.pair_order``), so a row whose partner is in the next batch waits here: at
    most one row per layer at a time.
    """

    def __init__(self, moments: _core.PairMoments, partner: Sequence[int], is_positive: Sequence[bool]) -> None:
        self.moments, self.partner, self.is_positive = moments, partner, is_positive
        self.rows = DeviceRowCollector()
        self.waiting: list[dict[int, torch.Tensor]] = [{} for _ in range(moments.num_slots)]

    def begin(self, batch: TokenBatch) -> None:
        self.rows.begin(batch)

    def hook(self, slot: int) -> Callable:
        def add_pairs(module: nn.Module, args: tuple, output) -> None:
            batch = self.rows.batch
            hidden = block_output(unflatten_rows(output, batch.num_rows))
            rows = self.rows.select(hidden).cpu()
            waiting, extra, pos, neg = self.waiting[slot], [], [], []
            for r, row_id in enumerate(batch.row_ids):
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
    """Passes 2-D ``[batch * seq, hidden]`` outputs on to a CaptureHook as ``[batch, seq, hidden]``."""

    def __init__(self, hook: _core.CaptureHook, accumulator: _core.Accumulator) -> None:
        self.hook, self.accumulator = hook, accumulator

    def __call__(self, module: nn.Module, args: tuple, output):
        return self.hook(module, args, unflatten_rows(output, self.accumulator.batch_rows))


def accumulate_batches(
    model: nn.Module,
    blocks: Sequence[nn.Module],
    batches: Iterable[TokenBatch],
    accumulator: _core.Accumulator,
    on_batch: Callable[[TokenBatch], None] | None = None,
    unflatten: bool = False,
    moments: PairMomentHooks | None = None,
) -> None:
    """Run every batch through ``model``, adding outputs of ``blocks[slot]`` to ``slot``.

    ``unflatten``: the hooked modules may return ``[batch * seq, hidden]`` (OPT's MLP does);
    view such outputs as ``[batch, seq, hidden]`` before reading them. ``moments``: also
    feed second moments of the paired differences (rows must come in ``pair_order``).
    """
    device = input_device(model)
    deepest = deepest_module(model, blocks)
    # Used only for tensors the C core cannot read (an accelerator's, or offloaded blocks run there).
    collector = DeviceRowCollector()
    hooks = [
        _core.CaptureHook(accumulator, slot, stop=slot == deepest, device_rows=collector)
        for slot in range(len(blocks))
    ]
    callables = [_Unflattening(hook, accumulator) for hook in hooks] if unflatten else hooks
    # The moment hooks go first: the deepest CaptureHook ends the forward by raising.
    pairs = list(zip(blocks, callables))
    if moments is not None:
        pairs = [(block, moments.hook(slot)) for slot, block in enumerate(blocks)] + pairs
    with exclusive_use(model), eval_mode(model), forward_hooks(pairs), torch.inference_mode():
        try:
            for batch in batches:
                if moments is not None:
                    moments.begin(batch)
                _run_batch(model, batch, device, accumulator, hooks, collector)
                if on_batch is not None:
                    on_batch(batch)
        finally:
            accumulator.clear_batch()
    if moments is not None:
        moments.check_complete()


def _run_batch(
    model: nn.Module,
    batch: TokenBatch,
    device: torch.device,
    accumulator: _core.Accumulator,
    hooks: Sequence[_core.CaptureHook],
    collector: DeviceRowCollector,
) -> None:
    if batch.read_index is not None:
        accumulator.set_batch(batch.groups, index=batch.read_index)
    else:
        accumulator.set_batch(batch.groups, mask=batch.attention_mask)
    collector.begin(batch)
    calls_before = [hook.calls for hook in hooks]
    try:
        model(
            input_ids=batch.input_ids.to(device),
            attention_mask=batch.attention_mask.to(device),
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
    collector.flush(accumulator)
