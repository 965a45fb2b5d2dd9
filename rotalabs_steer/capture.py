"""One batched forward per batch, hooks on the requested blocks, early stop, clean exit.

The C CaptureHook on each requested block feeds the block output to the Accumulator
in place; the hook on the deepest block raises StopForward, so later blocks and the
LM head never run. Whatever happens (an error inside the forward, KeyboardInterrupt),
the hooks come off and every module's ``training`` flag is restored.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Callable, Iterable, Iterator, Sequence

import torch
from torch import nn

from . import _core
from .batching import TokenBatch


def input_device(model: nn.Module) -> torch.device:
    """Where input ids must live: the device of the input embeddings."""
    meta = [name for name, parameter in model.named_parameters() if parameter.device.type == "meta"]
    if meta:
        offloaded = _offloaded_modules(model)
        for name in meta:
            owner = name.rpartition(".")[0]
            if not any(path == "" or owner == path or owner.startswith(path + ".") for path in offloaded):
                raise ValueError(
                    f"model has parameters on the 'meta' device ({name}): its weights are not "
                    "loaded; load the model (or dispatch it with device_map) before extraction"
                )
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    weight = getattr(embeddings, "weight", None)
    if isinstance(weight, torch.Tensor):
        return weight.device
    first = next(model.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


_HOOKED: set[int] = set()  # ids of modules an extraction has hooks on right now
_HOOKED_LOCK = threading.Lock()


@contextmanager
def exclusive_use(modules: Sequence[nn.Module]) -> Iterator[None]:
    """Refuse a second extraction on the same blocks while one runs (e.g. from another thread).

    Forward hooks belong to the module, not to the caller: two extractions at once on one
    model would each see the other's forwards and silently mix their sums.
    """
    keys = {id(module) for module in modules}
    with _HOOKED_LOCK:
        if keys & _HOOKED:
            raise RuntimeError(
                "another extraction is running on this model right now (in another thread?); hooks "
                "belong to the model, so two at once would read each other's forwards: run them one "
                "after the other, or on separate copies of the model"
            )
        _HOOKED.update(keys)
    try:
        yield
    finally:
        with _HOOKED_LOCK:
            _HOOKED.difference_update(keys)


def _offloaded_modules(model: nn.Module) -> list[str]:
    """Paths of modules whose weights accelerate loads on the fly (device_map offload to cpu/disk).

    Their parameters sit on 'meta' between forwards by design; an accelerate hook
    (``_hf_hook``) on the module or an ancestor brings them in.
    """
    return [name for name, module in model.named_modules() if _offloads(getattr(module, "_hf_hook", None))]


def _offloads(hook) -> bool:
    if hook is None:
        return False
    if isinstance(getattr(hook, "hooks", None), (list, tuple)):  # accelerate's SequentialHook
        return any(_offloads(inner) for inner in hook.hooks)
    return bool(getattr(hook, "offload", False))


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """``model.eval()`` for the duration, then every module's own flag back."""
    flags = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in flags:
            module.training = training


@contextmanager
def forward_hooks(pairs: Iterable[tuple[nn.Module, Callable]], prepend: bool = False) -> Iterator[None]:
    """Register forward hooks (before existing ones if ``prepend``); remove them all on exit."""
    handles = []
    try:
        for module, hook in pairs:
            handles.append(module.register_forward_hook(hook, prepend=prepend))
        yield
    finally:
        for handle in handles:
            handle.remove()


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

    def _on(self, device: torch.device, cache: dict, source: torch.Tensor) -> torch.Tensor:
        if device not in cache:
            cache[device] = source.to(device, non_blocking=True)
        return cache[device]

    def __call__(self, slot: int, hidden: torch.Tensor) -> None:
        batch = self._batch
        if batch.read_index is not None:
            index = self._on(hidden.device, self._index, batch.read_index)
            rows = hidden[torch.arange(hidden.shape[0], device=hidden.device), index].float()
        else:
            mask = self._on(hidden.device, self._mask, batch.attention_mask).to(torch.float32)
            rows = torch.einsum("bs,bsh->bh", mask, hidden.float()) / mask.sum(1, keepdim=True)
        self._rows[slot] = rows

    def flush(self, accumulator: _core.Accumulator) -> None:
        by_device: dict[torch.device, list[int]] = {}
        for slot, rows in self._rows.items():
            by_device.setdefault(rows.device, []).append(slot)
        for slots in by_device.values():
            host = torch.stack([self._rows[s] for s in slots]).to("cpu")  # the one sync
            for k, slot in enumerate(slots):
                accumulator.add(slot, host[k], self._batch.groups)
        self._rows = {}


class _Unflattening:
    """Passes 2-D ``[batch * seq, hidden]`` outputs on to a CaptureHook as ``[batch, seq, hidden]``."""

    def __init__(self, hook: _core.CaptureHook, accumulator: _core.Accumulator) -> None:
        self.hook, self.accumulator = hook, accumulator

    def __call__(self, module: nn.Module, args: tuple, output):
        tensor = output[0] if isinstance(output, (tuple, list)) else output
        if isinstance(tensor, torch.Tensor) and tensor.dim() == 2:
            output = tensor.view(self.accumulator.batch_rows, -1, tensor.shape[-1])
        return self.hook(module, args, output)


def accumulate_batches(
    model: nn.Module,
    blocks: Sequence[nn.Module],
    batches: Iterable[TokenBatch],
    accumulator: _core.Accumulator,
    on_batch: Callable[[TokenBatch], None] | None = None,
    unflatten: bool = False,
) -> None:
    """Run every batch through ``model``, adding outputs of ``blocks[slot]`` to ``slot``.

    ``unflatten``: the hooked modules may return ``[batch * seq, hidden]`` (OPT's MLP does);
    view such outputs as ``[batch, seq, hidden]`` before reading them.
    """
    device = input_device(model)
    deepest = deepest_slot(model, blocks)
    # Used only for tensors the C core cannot read (an accelerator's, or offloaded blocks run there).
    collector = DeviceRowCollector()
    hooks = [
        _core.CaptureHook(accumulator, slot, stop=slot == deepest, device_rows=collector)
        for slot in range(len(blocks))
    ]
    callables = [_Unflattening(hook, accumulator) for hook in hooks] if unflatten else hooks
    with exclusive_use(blocks), eval_mode(model), forward_hooks(zip(blocks, callables)), torch.inference_mode():
        try:
            for batch in batches:
                _run_batch(model, batch, device, accumulator, hooks, collector)
                if on_batch is not None:
                    on_batch(batch)
        finally:
            accumulator.clear_batch()


def deepest_slot(model: nn.Module, blocks: Sequence[nn.Module]) -> int:
    """The slot whose block runs last: the latest in module registration order."""
    order = {id(module): k for k, module in enumerate(model.modules())}
    for slot, block in enumerate(blocks):
        if id(block) not in order:
            raise ValueError(f"layer_modules[{slot}] is not a submodule of the model")
    return max(range(len(blocks)), key=lambda slot: order[id(blocks[slot])])


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
