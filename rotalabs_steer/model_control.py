"""Borrowing a user's model and giving it back as it was: shared by extraction, steering,
raw activations and evaluation.

- ``HookSet``: forward hooks registered together and removed together, as a context manager
  or a handle (``attach`` / ``remove``), also after an exception or KeyboardInterrupt.
- ``eval_mode``: ``model.eval()`` for a while, then every module's own ``training`` flag back.
- ``exclusive_use``: one extraction per model at a time (hooks belong to the model).
- ``input_device`` / ``input_embeddings``: where input ids go, and the table they index.
- ``block_output`` / ``with_block_output`` / ``unflatten_rows``: the hidden tensor inside a
  module's output.
- ``real_token_index``: the last / first real token of each row of an attention mask.
"""

from __future__ import annotations

import threading
import weakref
from contextlib import contextmanager
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
from torch import nn


class HookSet:
    """Forward (pre-)hooks that come and go together.

    ``attach()`` registers all of them (none stays if one fails), ``remove()`` takes every one
    off; as a context manager it does both around the block.
    """

    def __init__(self, hooks: Iterable[tuple[nn.Module, Callable]] = (), *, prepend: bool = False,
                 pre_hooks: Iterable[tuple[nn.Module, Callable]] = ()) -> None:
        self._hooks = list(hooks)
        self._pre_hooks = list(pre_hooks)
        self._prepend = prepend
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    @property
    def forward_handles(self) -> list[torch.utils.hooks.RemovableHandle]:
        """Handles of the forward hooks only (pre-hooks are registered first)."""
        return self._handles[len(self._pre_hooks):]

    def attach(self) -> HookSet:
        if self._handles:
            return self
        try:
            for module, hook in self._pre_hooks:
                self._handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
            for module, hook in self._hooks:
                self._handles.append(module.register_forward_hook(hook, prepend=self._prepend))
        except BaseException:
            self.remove()
            raise
        return self

    def remove(self) -> None:
        handles, self._handles = self._handles, []
        for handle in handles:
            handle.remove()

    def __enter__(self) -> HookSet:
        return self.attach()

    def __exit__(self, *exc_info: Any) -> None:
        self.remove()


def forward_hooks(pairs: Iterable[tuple[nn.Module, Callable]], prepend: bool = False) -> HookSet:
    """Forward hooks on ``(module, hook)`` pairs for a ``with`` block (before existing ones if ``prepend``)."""
    return HookSet(pairs, prepend=prepend)


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


_BUSY: weakref.WeakSet[nn.Module] = weakref.WeakSet()  # models an extraction has hooks on right now
_BUSY_LOCK = threading.Lock()


@contextmanager
def exclusive_use(model: nn.Module) -> Iterator[None]:
    """Refuse a second extraction on ``model`` while one runs (e.g. from another thread).

    Forward hooks belong to the modules, not to the caller: two extractions at once on one model,
    whatever layers or components they read, would each see the other's forwards.
    """
    with _BUSY_LOCK:
        if model in _BUSY:
            raise RuntimeError(
                "another extraction is running on this model right now (in another thread?); hooks "
                "belong to the model, so two at once would read each other's forwards: run them one "
                "after the other, or on separate copies of the model"
            )
        _BUSY.add(model)
    try:
        yield
    finally:
        with _BUSY_LOCK:
            _BUSY.discard(model)


def input_embeddings(model: nn.Module) -> nn.Module | None:
    """The model's input embedding module, or None when it has none it will tell."""
    try:
        return model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    except NotImplementedError:
        return None


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
    weight = getattr(input_embeddings(model), "weight", None)
    if isinstance(weight, torch.Tensor):
        return weight.device
    first = next(model.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


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


def deepest_module(model: nn.Module, modules: Sequence[nn.Module], name: str = "layer_modules") -> int:
    """Index of the module in ``modules`` that runs last: the latest in registration order."""
    order = {id(module): k for k, module in enumerate(model.modules())}
    for k, module in enumerate(modules):
        if id(module) not in order:
            raise ValueError(f"{name}[{k}] is not a submodule of the model")
    return max(range(len(modules)), key=lambda k: order[id(modules[k])])


def block_output(output: Any) -> Any:
    """The hidden-state tensor of a module's output: the output itself, or the first item of
    the tuple or list that blocks (and MoE / attention submodules) return."""
    return output[0] if isinstance(output, (tuple, list)) else output


def with_block_output(output: Any, hidden: torch.Tensor) -> Any:
    """``output`` with its hidden-state tensor replaced by ``hidden`` (same container type)."""
    if isinstance(output, tuple):
        return (hidden, *output[1:])
    if isinstance(output, list):
        return [hidden, *output[1:]]
    return hidden


def unflatten_rows(output: Any, batch_rows: int | None) -> Any:
    """``output`` with a 2-D ``[batch * seq, hidden]`` hidden tensor viewed as ``[batch, seq, hidden]``.

    OPT's feed-forward ends in ``fc2``, which returns its rows flattened over the batch.
    """
    tensor = block_output(output)
    if not batch_rows or not isinstance(tensor, torch.Tensor) or tensor.dim() != 2:
        return output
    return with_block_output(output, tensor.view(batch_rows, -1, tensor.shape[-1]))


def real_token_index(mask: torch.Tensor, which: str) -> torch.Tensor:
    """Per row of a ``[batch, seq]`` attention mask, the position of its ``"last"`` or
    ``"first"`` real token; a row with none gives -1 (``"last"``) or ``seq`` (``"first"``),
    which match no position."""
    real = mask.bool()
    seq = real.shape[1]
    positions = torch.arange(seq, device=real.device).expand_as(real)
    if which == "last":
        return torch.where(real, positions, -1).amax(dim=1)
    if which == "first":
        return torch.where(real, positions, seq).amin(dim=1)
    raise ValueError(f"which must be 'last' or 'first', got {which!r}")
