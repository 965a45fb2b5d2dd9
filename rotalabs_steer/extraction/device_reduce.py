"""Reduction on the device that holds the activations: no host sync between batches.

For tensors the C core cannot read (an accelerator's), or for every tensor with
``reduce_on="device"``, each hooked layer's rows are selected and summed where they are,
by torch kernels queued behind the forward: a gather (one token per row) or a masked
``bmm`` (mean over real tokens), then an ``index_add_`` into float64 sums and counts per
(slot, row group) that live on that device. Rows kept for the held-out separation figures
are chosen before the first forward (the number of rows is known), so choosing needs no
decision on the host either: each batch copies its chosen rows into a preallocated buffer.
Nothing leaves the device until ``merge_into``, one transfer per device at the end.
"""

from __future__ import annotations

import random

import numpy as np
import torch

from .. import _core
from .batching import TokenBatch


class _DeviceState:
    """Float64 sums / counts per (slot, group) and the sampled rows, on one device."""

    def __init__(self, device: torch.device, num_slots: int, num_groups: int, hidden: int, sample_rows: int):
        # One spare group and one spare sample row: where rows to skip (group -1, not sampled) go,
        # so that no mask has to be turned into indices on the host.
        self.sums = torch.zeros(num_slots, num_groups + 1, hidden, dtype=torch.float64, device=device)
        self.counts = torch.zeros(num_slots, num_groups + 1, dtype=torch.int64, device=device)
        self.samples = torch.zeros(num_slots, sample_rows + 1, hidden, dtype=torch.float64, device=device)
        self.sample_groups = torch.full((num_slots, sample_rows + 1), -1, dtype=torch.int64, device=device)


class BatchRows:
    """The rows a batch reads from a ``[batch, seq, hidden]`` tensor, selected where it lives.

    ``begin(batch, **extra)`` before each forward (``extra``: per-row host tensors wanted on the
    device too); ``select(hidden)`` gives float64 ``[batch, hidden]``: the read token of each row
    (a gather), or the mean over its real tokens (a masked bmm). The batch's index / mask and
    extras are copied to each device once, without blocking the host.
    """

    def __init__(self) -> None:
        self.batch: TokenBatch | None = None
        self._host: dict[str, torch.Tensor] = {}
        self._on: dict[torch.device, dict[str, torch.Tensor]] = {}

    def begin(self, batch: TokenBatch, **extra: torch.Tensor) -> None:
        self.batch, self._on = batch, {}
        read = {"index": batch.read_index} if batch.read_index is not None else {"mask": batch.attention_mask}
        self._host = {**read, **extra}

    def on(self, device: torch.device) -> dict[str, torch.Tensor]:
        if device not in self._on:
            self._on[device] = {key: to_device(value, device) for key, value in self._host.items()}
        return self._on[device]

    def select(self, hidden: torch.Tensor) -> torch.Tensor:
        inputs = self.on(hidden.device)
        if "index" in inputs:
            return hidden[torch.arange(hidden.shape[0], device=hidden.device), inputs["index"]].to(torch.float64)
        # Sum over real tokens as one masked bmm in float32, float64 from there on.
        mask = inputs["mask"]
        total = torch.bmm(mask[:, None, :].float(), hidden.float()).squeeze(1).to(torch.float64)
        return total / mask.sum(1, keepdim=True).to(torch.float64)


class DeviceReducer:
    """Reduces ``[batch, seq, hidden]`` block outputs on their own device (``__call__(slot, hidden)``).

    ``begin(batch)`` before each forward; ``merge_into(accumulator)`` once at the end adds the
    sums and counts to the C accumulator's; ``samples(slot)`` gives the sampled rows of a slot
    reduced here (None for a slot that never was).
    """

    def __init__(self, num_slots: int, num_groups: int, hidden: int, total_rows: int, sample_rows: int = 0,
                 seed: int = 0) -> None:
        self.num_slots, self.num_groups, self.hidden = num_slots, num_groups, hidden
        self.sample_rows = min(sample_rows, total_rows)
        # Sample slot of every row this process runs, chosen ahead; the spare slot for the others.
        chosen = random.Random(seed).sample(range(total_rows), self.sample_rows)
        self._sample_slot = torch.full((total_rows,), self.sample_rows, dtype=torch.int64)
        self._sample_slot[torch.as_tensor(chosen, dtype=torch.int64)] = torch.arange(self.sample_rows)
        self._states: dict[torch.device, _DeviceState] = {}
        self._slots_seen: set[int] = set()
        self.rows = BatchRows()
        self._host_samples: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def begin(self, batch: TokenBatch) -> None:
        extra = {"groups": torch.where(batch.groups < 0, self.num_groups, batch.groups)}
        if self.sample_rows:
            extra["sample_slot"] = self._sample_slot[batch.row_ids]
        self.rows.begin(batch, **extra)

    def _state(self, device: torch.device) -> _DeviceState:
        if device not in self._states:
            self._states[device] = _DeviceState(device, self.num_slots, self.num_groups, self.hidden,
                                                self.sample_rows)
        return self._states[device]

    def __call__(self, slot: int, hidden: torch.Tensor) -> None:
        rows = self.rows.select(hidden)
        inputs = self.rows.on(hidden.device)
        state = self._state(hidden.device)
        state.sums[slot].index_add_(0, inputs["groups"], rows)
        state.counts[slot].index_add_(0, inputs["groups"], torch.ones_like(inputs["groups"]))
        if self.sample_rows:
            state.samples[slot].index_copy_(0, inputs["sample_slot"], rows)
            state.sample_groups[slot].index_copy_(0, inputs["sample_slot"], inputs["groups"])
        self._slots_seen.add(slot)

    def merge_into(self, accumulator: _core.Accumulator) -> None:
        """Add the device sums and counts to ``accumulator`` (one transfer per device)."""
        if not self._states:
            return
        sums, counts = accumulator.state()
        for state in self._states.values():
            sums += state.sums[:, : self.num_groups].cpu().numpy()
            counts += state.counts[:, : self.num_groups].cpu().numpy()
            if self.sample_rows:
                rows = state.samples[:, : self.sample_rows].cpu().numpy()
                groups = state.sample_groups[:, : self.sample_rows].cpu().numpy()
                for slot in range(self.num_slots):
                    taken = (groups[slot] >= 0) & (groups[slot] < self.num_groups)
                    if taken.any():
                        self._host_samples[slot] = (rows[slot][taken], groups[slot][taken])
        accumulator.load_state(sums, counts)

    def samples(self, slot: int) -> tuple[np.ndarray, np.ndarray] | None:
        """The rows sampled from ``slot`` and their group codes, if it was reduced here."""
        if slot not in self._slots_seen:
            return None
        empty = (np.zeros((0, self.hidden)), np.zeros(0, dtype=np.int64))
        return self._host_samples.get(slot, empty)


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host to ``device`` without blocking the host: through pinned memory on CUDA."""
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)
