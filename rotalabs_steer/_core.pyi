"""Type stubs for the C extension rotalabs_steer._core (csrc/)."""

from typing import Any, Callable, Protocol, final

import numpy as np
import numpy.typing as npt

class _DLPackable(Protocol):
    def __dlpack__(self, *args: Any, **kwargs: Any) -> Any: ...

_Tensor = _DLPackable | Any  # torch.Tensor, numpy.ndarray or a DLPack capsule

class StopForward(BaseException):
    """Raised by the deepest CaptureHook to end a forward pass early.

    A BaseException (like GeneratorExit): a control-flow signal, not an error, so an
    ``except Exception:`` in a module or hook between the hook and the caller does not
    swallow it. Catch it by name.
    """

@final
class Accumulator:
    """Float64 sums and row counts per (slot, group)."""

    def __new__(
        cls, num_slots: int, hidden: int, num_groups: int = 2, *, sample_rows: int = 0, seed: int = 0
    ) -> Accumulator: ...
    @property
    def sample_rows(self) -> int: ...
    @property
    def num_slots(self) -> int: ...
    @property
    def num_groups(self) -> int: ...
    @property
    def hidden(self) -> int: ...
    @property
    def batch_rows(self) -> int | None: ...
    def add(
        self,
        slot: int,
        activations: _Tensor,
        groups: _Tensor,
        *,
        index: _Tensor | None = None,
        mask: _Tensor | None = None,
    ) -> None: ...
    def set_batch(self, groups: _Tensor, *, index: _Tensor | None = None, mask: _Tensor | None = None) -> None: ...
    def clear_batch(self) -> None: ...
    def add_batch(self, slot: int, activations: _Tensor, /) -> None: ...
    def state(self) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.int64]]: ...
    def load_state(self, sums: _Tensor, counts: _Tensor, /) -> None: ...
    def merge(self, other: Accumulator, /) -> None: ...
    def samples(self, slot: int, /) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.int64]]: ...
    def reset(self) -> None: ...

@final
class CaptureHook:
    """Forward hook feeding a block's output to an Accumulator slot."""

    def __new__(
        cls,
        accumulator: Accumulator,
        slot: int,
        *,
        stop: bool = False,
        device_rows: Callable[[int, Any], None] | None = None,
    ) -> CaptureHook: ...
    def __call__(self, *args: Any) -> None: ...
    @property
    def calls(self) -> int: ...
    @property
    def slot(self) -> int: ...
    @property
    def stop(self) -> bool: ...
    @property
    def accumulator(self) -> Accumulator: ...

def dlpack_info(tensor: _Tensor, /) -> dict[str, Any]: ...
