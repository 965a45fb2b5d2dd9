"""Extraction over several processes with ``torch.distributed``.

Accumulators are float64 sums and counts, so ranks merge by addition: each rank runs the
forward over its share of the texts, then one all-reduce of the state gives every rank the
same totals (and so the same vectors). Launch with ``torchrun``; use the ``gloo`` backend
on CPU and ``nccl`` on GPUs (collectives then run on the rank's current CUDA device).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
import torch.distributed as dist

from .. import _core


def resolve_group(process_group: Any):
    """The group to extract over, or None for this process alone.

    ``None`` means the world group when ``torch.distributed`` is initialised; ``False``
    means this process alone even then (e.g. extraction on rank 0 of a training job).
    """
    if process_group is False:
        return None
    initialised = dist.is_available() and dist.is_initialized()
    if process_group is None:
        return dist.group.WORLD if initialised and dist.get_world_size() > 1 else None
    if not initialised:
        raise ValueError("process_group was given, but torch.distributed is not initialised "
                         "(call torch.distributed.init_process_group first, e.g. under torchrun)")
    if not isinstance(process_group, dist.ProcessGroup):
        raise TypeError(f"process_group must be a torch.distributed ProcessGroup, None or False, "
                        f"not {type(process_group).__name__}")
    return process_group


def rank_and_size(group) -> tuple[int, int]:
    if group is None:
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def share_of_rows(lengths: Sequence[int], group) -> list[int]:
    """Indices of the rows this rank runs: every world-th row by length, for balanced work."""
    rank, size = rank_and_size(group)
    by_length = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return sorted(by_length[rank::size])


def _collective_device(group) -> torch.device:
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_state(accumulator: _core.Accumulator, group) -> None:
    """Replace every rank's sums and counts by their totals over the group."""
    sums, counts = accumulator.state()
    device = _collective_device(group)
    sums_t, counts_t = torch.from_numpy(sums).to(device), torch.from_numpy(counts).to(device)
    dist.all_reduce(sums_t, group=group)
    dist.all_reduce(counts_t, group=group)
    accumulator.load_state(sums_t.cpu(), counts_t.cpu())


def gather_samples(rows: np.ndarray, groups: np.ndarray, group) -> tuple[np.ndarray, np.ndarray]:
    """Every rank's sampled rows, concatenated in rank order (the same on every rank)."""
    gathered: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, (rows, groups), group=group)
    hidden = rows.shape[1]
    all_rows = [r for r, _ in gathered if len(r)]
    all_groups = [g for _, g in gathered if len(g)]
    if not all_rows:
        return np.zeros((0, hidden)), np.zeros(0, dtype=np.int64)
    return np.concatenate(all_rows), np.concatenate(all_groups)


def all_reduce_moments(moments: _core.PairMoments, group) -> None:
    """Replace every rank's pair counts, difference sums and second moments by their totals."""
    device = _collective_device(group)
    totals = [torch.from_numpy(array).to(device) for array in moments.state()]
    for tensor in totals:
        dist.all_reduce(tensor, group=group)
    moments.load_state(*(tensor.cpu() for tensor in totals))
