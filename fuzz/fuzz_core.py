"""Fuzzer for the C entry points of rotalabs_steer._core, with a NumPy float64 oracle.

Entry points driven: Accumulator(...), .add, .set_batch, .add_batch, .clear_batch, .state,
.load_state, .merge, .samples, .reset; CaptureHook(...).__call__ (direct and device_rows
routes, tuple/list/plain outputs, stop=True); dlpack_info.

Inputs: NumPy arrays with random shapes, dtypes, offsets and strides (zero and negative,
through numpy.lib.stride_tricks.as_strided), torch tensors (bfloat16, transposed, expanded,
as_strided with a storage offset), hand-made DLPack capsules from tests/dlpack_fakes.py
(versioned and legacy, renamed, unknown major version, NULL deleter/strides/shape/data,
misaligned data or byte_offset, unreadable devices, unsupported dtypes, over-long ndim,
negative or overflowing shapes, size-0 shapes whose NULL strides overflow), producers that fail, return non-capsules, answer
__dlpack_device__ oddly or re-enter the accumulator, and random group/index/mask arrays.

Oracle, for every operation:
  * only TypeError, ValueError, IndexError, BufferError, RuntimeError, OverflowError (and
    StopForward from a stop=True hook) may be raised; anything else is a finding;
  * a Python model of the accumulator (float64 NumPy sums, int64 counts, every offered row)
    decides independently whether each call is valid: a valid call must succeed and leave
    state() equal to the model's; an invalid one must raise and leave the state untouched;
  * the reservoir sample only holds offered rows, with their groups;
  * every hand-made capsule's deleter ran exactly once (none when the capsule was never
    the producer's to free: a foreign name or a NULL deleter);
  * dlpack_info reports the shape, strides, dtype, device and capsule kind it was given.
A native crash (ASan/UBSan report, segfault) is a finding too.

Run:
  python fuzz/fuzz_core.py -max_total_time=60            # atheris (coverage of this harness)
  python fuzz/fuzz_core.py --random --seconds 60 [--seed N]  # no atheris: random.Random drives it
  python fuzz/fuzz_core.py crash-<hash>                  # replay an atheris artifact
  make fuzz FUZZ_SECONDS=60                              # atheris under the ASan+UBSan build
  make fuzz-short                                        # 20 s of the same

atheris only sees Python coverage here (the C core is built by gcc without libFuzzer
instrumentation), so its guidance steers the harness's own branches: which entry point,
which layout, which corruption. The C code is checked by the oracle and by ASan/UBSan.
"""

from __future__ import annotations

import gc
import os
import random
import sys
import time

import numpy as np

np.seterr(all="ignore")  # inf/NaN activations are part of the input space

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

import torch  # noqa: E402

import dlpack_fakes as fk  # noqa: E402
from rotalabs_steer import _core  # noqa: E402

torch.set_num_threads(1)

EXPECTED = (TypeError, ValueError, IndexError, BufferError, RuntimeError, OverflowError)
FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")
INT_DTYPES = ("int8", "int16", "int32", "int64", "uint8", "bool")
BAD_DTYPES = ("uint16", "uint32", "complex64", "float32", "int64")  # "bad" for the other role
READABLE_DEVICES = (fk.CPU, fk.CUDA_HOST, fk.CUDA_MANAGED)


class Finding(AssertionError):
    """The oracle disagrees with the C core."""


def check(condition, message):
    if not condition:
        raise Finding(message)


# ------------------------------------------------------------------------------ sources


class RandomSource:
    """Decisions from random.Random (the fallback when atheris is not installed)."""

    def __init__(self, seed: int) -> None:
        self.r = random.Random(seed)

    def int(self, lo: int, hi: int) -> int:
        return self.r.randint(lo, hi)

    def bool(self, p: float = 0.5) -> bool:
        return self.r.random() < p

    def pick(self, seq):
        return seq[self.r.randrange(len(seq))]


class AtherisSource:
    """Decisions from atheris' FuzzedDataProvider."""

    def __init__(self, data: bytes) -> None:
        import atheris

        self.f = atheris.FuzzedDataProvider(data)

    def int(self, lo: int, hi: int) -> int:
        return self.f.ConsumeIntInRange(lo, hi)

    def bool(self, p: float = 0.5) -> bool:
        return self.f.ConsumeIntInRange(0, 255) < int(p * 256)

    def pick(self, seq):
        return seq[self.f.ConsumeIntInRange(0, len(seq) - 1)]


# ------------------------------------------------------------------------------- values


def dyadic(rng: np.random.Generator, n: int, special: bool) -> np.ndarray:
    """k/16 with |k| <= 255: exact in every float dtype, so sums are exact in any order."""
    values = rng.integers(-255, 256, size=n) / 16.0
    if special and n:
        k = rng.integers(0, n)
        values[k] = rng.choice([np.inf, -np.inf, np.nan])
    return values


def strided_numpy(src, rng, shape, dtype, values=None, special=False) -> np.ndarray:
    """A NumPy view of ``shape`` over a larger buffer: random offset and element strides in
    {-2, -1, 0, 1, 2, 3} x the contiguous stride, every addressed element inside the buffer."""
    dtype = np.dtype(dtype)
    contiguous = [int(np.prod(shape[d + 1:], dtype=np.int64)) for d in range(len(shape))]
    strides = [src.pick((1, 1, 1, -1, 0, 2, -2, 3)) * c for c in contiguous]
    if any(n == 0 for n in shape):
        lo = hi = 0
    else:
        lo = sum(min(0, s * (n - 1)) for s, n in zip(strides, shape))
        hi = sum(max(0, s * (n - 1)) for s, n in zip(strides, shape))
    front, back = src.int(0, 2), src.int(0, 2)
    size = hi - lo + 1 + front + back
    if dtype == np.bool_ or dtype.kind in "iu":
        raw = values if values is not None else rng.integers(-3, 6, size=size)
        buf = np.resize(np.asarray(raw, dtype=np.int64), size).astype(dtype)
    else:
        buf = dyadic(rng, size, special).astype(dtype)
    start = front - lo
    # the values seen through the view are whatever the layout picks out of the buffer
    return np.lib.stride_tricks.as_strided(buf[start:], shape=shape,
                                           strides=[s * dtype.itemsize for s in strides])


def torch_tensor(src, rng, shape, dtype_name, special=False) -> torch.Tensor:
    """A torch tensor of ``shape``: contiguous, transposed, sliced with a step, expanded,
    or as_strided over a bigger storage with an offset."""
    dtype = getattr(torch, dtype_name)
    numel = int(np.prod(shape, dtype=np.int64))
    how = src.pick(("contiguous", "transposed", "step", "expand", "as_strided"))
    make = (lambda n: torch.tensor(dyadic(rng, n, special), dtype=torch.float64).to(dtype)) \
        if dtype.is_floating_point else (lambda n: torch.tensor(rng.integers(-3, 6, size=n)).to(dtype))
    if how == "transposed" and len(shape) >= 2:
        base = make(numel).reshape(*shape[:-2], shape[-1], shape[-2])
        return base.transpose(-1, -2)
    if how == "step" and len(shape) >= 1:
        base = make(numel * 2).reshape(*shape[:-1], shape[-1] * 2)
        return base[..., ::2]
    if how == "expand" and len(shape) >= 1 and shape[0] > 0:
        return make(int(np.prod(shape[1:], dtype=np.int64))).reshape(1, *shape[1:]).expand(*shape)
    if how == "as_strided":
        offset = src.int(0, 3)
        contiguous = [int(np.prod(shape[d + 1:], dtype=np.int64)) for d in range(len(shape))]
        strides = [src.pick((1, 0, 2)) * c for c in contiguous]
        span = 1 + sum(s * (n - 1) for s, n in zip(strides, shape) if n > 0)
        return torch.as_strided(make(offset + span), shape, strides, offset)
    return make(numel).reshape(shape)


def as_float64(obj) -> np.ndarray:
    if isinstance(obj, torch.Tensor):
        return obj.to(torch.float64).numpy()
    return np.asarray(obj).astype(np.float64)


def as_int64(obj) -> np.ndarray:
    if isinstance(obj, torch.Tensor):
        return obj.to(torch.int64).numpy()
    return np.asarray(obj).astype(np.int64)


# ------------------------------------------------------------------------- hand-made capsules


class Registry:
    """Hand-made capsules of one run: their deleters must have run exactly once at the end."""

    def __init__(self) -> None:
        self.fakes: list[tuple[fk.FakeTensor, int]] = []

    def add(self, fake: fk.FakeTensor, expected_deletes: int) -> None:
        self.fakes.append((fake, expected_deletes))

    def finish(self) -> None:
        for fake, _ in self.fakes:
            fake.capsule = None  # drop the producer's own reference: unconsumed capsules die now
        for fake, expected in self.fakes:
            check(fake.deleter_calls == expected,
                  f"deleter ran {fake.deleter_calls} times, expected {expected} ({fake.info})")
            check(all(a == fake.address for a in fake.deleter_args), "deleter called with another pointer")
        self.fakes = []


def make_fake(src, rng, registry: Registry, view: np.ndarray, *, role: str):
    """A hand-made capsule over the memory of ``view`` (a strided NumPy view), valid or with
    one corruption. Returns (object to pass, valid?, layout description)."""
    base = view
    while isinstance(base.base, np.ndarray):
        base = base.base
    itemsize = view.dtype.itemsize
    offset_bytes = view.__array_interface__["data"][0] - base.__array_interface__["data"][0]
    shape = tuple(view.shape)
    strides = tuple(s // itemsize for s in view.strides)
    kwargs = dict(shape=shape, strides=strides, versioned=src.bool(0.7))
    if src.bool(0.5):
        kwargs["data"] = offset_bytes
    else:
        kwargs["data"], kwargs["byte_offset"] = 0, offset_bytes
    dtype = fk._dlpack_dtype(view.dtype)
    kwargs["dtype"] = dtype
    kwargs["device"] = (src.pick(READABLE_DEVICES), src.int(0, 3))
    valid = True
    corruption = "none"
    if src.bool(0.35):
        corruption = src.pick((
            "dtype_complex", "dtype_lanes", "dtype_float8", "dtype_bits", "dtype_uint16", "device_cuda",
            "device_rocm", "device_unknown", "ndim_9", "null_data", "null_shape", "negative_shape",
            "shape_overflow", "misaligned", "version_2", "version_0", "name_used", "name_other",
            "null_deleter", "null_strides_contiguous", "size0_huge_null_strides",
        ))
        valid = False
        if corruption == "dtype_complex":
            kwargs["dtype"] = (fk.COMPLEX, 64, 1)
        elif corruption == "dtype_lanes":
            kwargs["dtype"] = (dtype[0], dtype[1], 2)
        elif corruption == "dtype_float8":
            kwargs["dtype"] = (fk.FLOAT8_E4M3FN, 8, 1)
        elif corruption == "dtype_bits":  # widths no code supports (never a readable dtype)
            kwargs["dtype"] = (dtype[0], src.pick((1, 4, 12, 24, 128)), 1)
        elif corruption == "dtype_uint16":
            kwargs["dtype"] = (fk.UINT, 16, 1)
        elif corruption == "device_cuda":
            kwargs["device"] = (fk.CUDA, 0)
        elif corruption == "device_rocm":
            kwargs["device"] = (10, 0)
        elif corruption == "device_unknown":
            kwargs["device"] = (src.pick((0, 99, -1, 2**31 - 1)), 0)
        elif corruption == "ndim_9":
            kwargs["shape"] = (1,) * (9 - len(shape)) + shape
            kwargs["strides"] = (0,) * (9 - len(shape)) + strides
        elif corruption == "null_data":
            kwargs["data"] = "null"
            valid = view.size == 0  # a size-0 tensor may have NULL data
        elif corruption == "null_shape":
            kwargs["null_shape"] = True
            valid = len(shape) == 0
        elif corruption == "negative_shape" and shape:
            d = src.int(0, len(shape) - 1)
            kwargs["shape"] = shape[:d] + (-src.int(1, 2**62),) + shape[d + 1:]
        elif corruption == "shape_overflow" and len(shape) >= 2:
            kwargs["shape"] = (2**62, 2**62) + shape[2:]
            kwargs["strides"] = (0, 0) + strides[2:]
        elif corruption == "size0_huge_null_strides":
            # row-major (NULL) strides of a size-0 tensor whose other dims multiply past int64:
            # computing them was a signed overflow; now a BufferError
            kwargs["shape"] = src.pick(((0, 2**62, 2**62), (0, 4, 2**62), (3, 0, 2**40, 2**40)))
            kwargs["strides"], kwargs["null_strides"] = None, True
        elif corruption == "misaligned" and itemsize > 1:
            kwargs["byte_offset"] = kwargs.get("byte_offset", 0) + src.int(1, itemsize - 1)
            valid = view.size == 0  # the alignment of a size-0 tensor's data is never checked
        elif corruption == "version_2":
            kwargs["versioned"], kwargs["version"] = True, (2, 0)
        elif corruption == "version_0":
            kwargs["versioned"], kwargs["version"] = True, (0, src.int(0, 9))
        elif corruption in ("name_used", "name_other"):
            kwargs["name"] = (b"used_dltensor_versioned" if kwargs["versioned"] else b"used_dltensor") \
                if corruption == "name_used" else b"not_a_tensor"
        elif corruption == "null_deleter":
            kwargs["null_deleter"] = True
            valid = True
        elif corruption == "null_strides_contiguous":
            if view.flags.c_contiguous or view.size == 0 or len(shape) == 0:
                kwargs["strides"], kwargs["null_strides"] = None, True
            valid = True
        else:
            valid = True  # a corruption that does not apply to this shape
            corruption = "none"
    fake = fk.FakeTensor(base, **kwargs)
    fake.info = f"{role} {corruption} {kwargs}"
    foreign_name = "name" in kwargs
    expected_deletes = 0 if kwargs.get("null_deleter") or foreign_name else 1
    registry.add(fake, expected_deletes)
    obj = fake.take_capsule()
    if src.bool(0.3):
        obj = fk.Producer(obj, accepts_max_version=src.bool(0.7))
    # null strides describe a row-major tensor; the readable view stays `view`
    return obj, valid, fake


def wrap(src, rng, registry, view: np.ndarray, *, role: str, allow_torch: bool = True):
    """The object passed to C for the data in ``view``, and whether it is valid to read:
    the NumPy view itself, a torch copy/view, a raw __dlpack__ capsule, or a hand-made one."""
    how = src.pick(("numpy", "numpy", "capsule", "fake", "fake", "torch"))
    if how == "numpy":
        return view, True, view
    if how == "capsule":
        try:
            return view.__dlpack__(max_version=(1, 0)), True, view
        except BufferError:
            return view, True, view
    if how == "torch" and allow_torch and view.dtype != np.float16 and view.strides and min(view.strides) >= 0:
        try:
            return torch.from_numpy(view), True, view
        except (ValueError, TypeError, RuntimeError):
            return view, True, view
    if how == "fake":
        obj, valid, _ = make_fake(src, rng, registry, view, role=role)
        return obj, valid, view
    return view, True, view


# ----------------------------------------------------------------------------- the model


class ModelAccumulator:
    """What the accumulator must hold: float64 sums, int64 counts, every offered row."""

    def __init__(self, slots, hidden, groups, sample_rows):
        self.slots, self.hidden, self.groups, self.sample_rows = slots, hidden, groups, sample_rows
        self.sums = np.zeros((slots, groups, hidden))
        self.counts = np.zeros((slots, groups), dtype=np.int64)
        self.offered = [[] for _ in range(slots)]
        self.batch = None  # (groups, index, mask) as int64 arrays, or None

    def compare(self, acc, where):
        sums, counts = acc.state()
        check(sums.shape == self.sums.shape and counts.shape == self.counts.shape, f"{where}: state shapes")
        check(np.array_equal(counts, self.counts), f"{where}: counts {counts.tolist()} != {self.counts.tolist()}")
        if np.array_equal(sums, self.sums):
            return
        scale = np.maximum(1.0, np.abs(np.nan_to_num(self.sums, nan=0, posinf=0, neginf=0)))
        same = np.isclose(sums, self.sums, rtol=1e-12, atol=0, equal_nan=True) | (
            np.abs(sums - self.sums) <= 1e-12 * scale)
        if not same.all():
            raise Finding(f"{where}: sums differ: {sums.tolist()} != {self.sums.tolist()}")

    def check_samples(self, acc, slot):
        rows, groups = acc.samples(slot)
        offered = self.offered[slot]
        n = min(len(offered), self.sample_rows)
        check(rows.shape == (n, self.hidden) and groups.shape == (n,), f"samples({slot}) shape {rows.shape}")
        for row, group in zip(rows, groups):
            check(any(g == group and np.allclose(row, r, rtol=1e-12, atol=1e-12, equal_nan=True)
                      for r, g in offered), f"samples({slot}): a row that was never offered")


def reference_add(model, slot, act64, groups, index, mask):
    """Apply a valid add to the model."""
    for b, g in enumerate(groups):
        if g < 0:
            continue
        if index is not None:
            row = act64[b, index[b]]
        elif mask is not None:
            row = act64[b][mask[b] != 0].sum(axis=0) * (1.0 / int((mask[b] != 0).sum()))
        else:
            row = act64[b]
        model.counts[slot, g] += 1
        model.sums[slot, g] += row
        model.offered[slot].append((row.copy(), g))


# ------------------------------------------------------------------------------- building


def int_array(src, rng, registry, length_shape, values, dtype, *, role):
    view = strided_numpy(src, rng, length_shape, dtype, values=values)
    return wrap(src, rng, registry, view, role=role)


def build_plan(src, rng, registry, model, rows, seq):
    """Random groups/index/mask inputs. Returns (kwargs objects, reference plan or error)."""
    error = None
    # groups
    g_values = [src.pick((-1, 0, 1, 0, 1, model.groups - 1, model.groups, -2, 2**40, -(2**40)))
                for _ in range(rows)]
    g_dtype = src.pick(INT_DTYPES + ("float32",) if src.bool(0.1) else INT_DTYPES)
    g_len = rows if src.bool(0.95) else (rows, 1)
    groups_shape = (g_len,) if isinstance(g_len, int) else g_len
    g_obj, g_ok, g_view = int_array(src, rng, registry, groups_shape, g_values, g_dtype, role="groups")
    if not g_ok:
        error = "groups capsule"
    if g_dtype == "float32":
        error = error or "float groups"
    if len(groups_shape) != 1:
        error = error or "2-D groups"
    groups = as_int64(g_view).reshape(-1) if error is None else None
    if groups is not None and ((groups < -1) | (groups >= model.groups)).any():
        error = "group out of range"
    # index or mask (or neither, or both)
    kind = src.pick(("rows", "index", "index", "mask", "mask", "both"))
    index = mask = None
    objs = {"groups": g_obj}
    if kind in ("index", "both"):
        length = rows if src.bool(0.95) else rows + 1
        values = [src.pick((0, 1, seq - 1, seq, -1, 2, 2**62, -(2**62))) for _ in range(length)]
        dtype = src.pick(INT_DTYPES + ("float64",) if src.bool(0.05) else INT_DTYPES)
        obj, ok, view = int_array(src, rng, registry, (length,), values, dtype, role="index")
        objs["index"] = obj
        if not ok or dtype == "float64":
            error = error or "bad index"
        elif length != rows:
            error = error or "index length"
        else:
            index = as_int64(view)
    if kind in ("mask", "both"):
        width = seq if src.bool(0.9) else seq + 1
        values = [src.pick((0, 1, 1, 0, 7, -1)) for _ in range(rows * width)]
        dtype = src.pick(INT_DTYPES + ("float32",) if src.bool(0.05) else INT_DTYPES)
        shape = (rows, width) if src.bool(0.95) else (rows * width,)
        obj, ok, view = int_array(src, rng, registry, shape, values, dtype, role="mask")
        objs["mask"] = obj
        if not ok or dtype == "float32" or len(shape) != 2:
            error = error or "bad mask"
        else:
            mask = as_int64(view)
            if groups is not None and error is None:
                for b in range(rows):
                    if groups[b] >= 0 and not (mask[b] != 0).any():
                        error = "empty mask row"
    if kind == "both":
        error = error or "index and mask"
    return objs, (groups, index, mask, kind, error)


def build_activations(src, rng, registry, model, rows, seq, kind):
    """Activations for a plan of ``kind``; returns (object, float64 values or None, error)."""
    hidden = model.hidden if src.bool(0.93) else model.hidden + src.pick((1, -1 if model.hidden > 1 else 1))
    ndim = 2 if kind == "rows" else 3
    if src.bool(0.05):
        ndim = src.pick((1, 2, 3, 4))
    n_rows = rows if src.bool(0.95) else rows + 1
    shape = {1: (n_rows * hidden,), 2: (n_rows, hidden), 3: (n_rows, seq, hidden),
             4: (n_rows, seq, 1, hidden)}[ndim]
    dtype = src.pick(FLOAT_DTYPES + ("int32",) if src.bool(0.05) else FLOAT_DTYPES)
    special = src.bool(0.05)
    error = None
    if dtype == "bfloat16":
        tensor = torch_tensor(src, rng, shape, dtype, special)
        obj, ok, values = tensor, True, as_float64(tensor)
        if src.bool(0.3):
            obj = tensor.__dlpack__()
    elif src.bool(0.2):
        tensor = torch_tensor(src, rng, shape, dtype, special)
        obj, ok, values = tensor, True, as_float64(tensor)
    else:
        view = strided_numpy(src, rng, shape, dtype, special=special)
        obj, ok, view = wrap(src, rng, registry, view, role="activations")
        values = as_float64(view)
    if not ok:
        error = "activations capsule"
    if dtype == "int32":
        error = error or "int activations"
    return obj, values, error


def activation_error(values, model, plan):
    """Why activations of these values cannot be added with ``plan``, or None."""
    groups, index, mask, kind = plan
    if values.ndim != (2 if kind == "rows" else 3):
        return "ndim"
    if values.shape[0] != len(groups) or values.shape[-1] != model.hidden:
        return "shape"
    if kind == "mask" and values.shape[1] != mask.shape[1]:
        return "mask width"
    if kind == "index" and any(groups[b] >= 0 and not 0 <= index[b] < values.shape[1]
                               for b in range(len(groups))):
        return "index out of range"
    return None


# ------------------------------------------------------------------------------ operations


def op_add(src, rng, registry, acc, model, batched=False, hook=False):
    rows, seq = src.int(0, 4), src.int(0, 4)
    objs, (groups, index, mask, kind, plan_error) = build_plan(src, rng, registry, model, rows, seq)
    act, values, act_error = build_activations(src, rng, registry, model, rows, seq, kind)
    slot = src.pick((0, 0, 1, model.slots - 1, model.slots, -1, 2**63 - 1))
    slot_error = None if 0 <= slot < model.slots else "slot"
    extra = {k: v for k, v in objs.items() if k != "groups"}
    if not batched:
        plan = (groups, index, mask, kind)
        error = plan_error or act_error or slot_error or activation_error(values, model, plan)
        try:
            acc.add(slot, act, objs["groups"], **extra)
        except EXPECTED:
            check(error is not None, f"add raised on a valid call ({kind}, slot {slot})")
            return
        check(error is None, f"add accepted an invalid call: {error}")
        reference_add(model, slot, values, groups, index, mask)
        return
    # set_batch (which keeps the old plan when it fails), then add_batch or a CaptureHook call
    try:
        acc.set_batch(objs["groups"], **extra)
        set_ok = True
    except EXPECTED:
        set_ok = False
    check(set_ok == (plan_error is None), f"set_batch: ok={set_ok} but the plan error is {plan_error}")
    if set_ok:
        model.batch = (groups, index, mask, kind)
    check(acc.batch_rows == (None if model.batch is None else len(model.batch[0])), "batch_rows")
    if model.batch is None:
        error = "no batch"
    else:
        error = act_error or slot_error or activation_error(values, model, model.batch)
    try:
        if hook:
            op_hook_call(src, acc, slot, act)
        else:
            acc.add_batch(slot, act)
    except EXPECTED:
        check(error is not None, f"add_batch/hook raised on a valid call ({model.batch and model.batch[3]})")
        return
    check(error is None, f"add_batch/hook accepted an invalid call: {error}")
    reference_add(model, slot, values, *model.batch[:3])


def op_hook_call(src, acc, slot, act):
    """Calls a CaptureHook with ``act`` as the module output (after, sometimes, a call with an
    unreadable tensor that must go to device_rows). Raises what the hook raises, except the
    StopForward of a stop=True hook, which it checks."""
    stop = src.bool(0.3)
    routed = []
    device_rows = (lambda s, t: routed.append((s, t))) if src.bool(0.5) else None
    hook = _core.CaptureHook(acc, slot, stop=stop, device_rows=device_rows)
    form = src.pick(("plain", "tuple", "list", "kwargs_form"))
    output = act if form == "plain" else (act, None) if form == "tuple" else [act, "x"] if form == "list" else act
    args = (None, (), output) if form != "kwargs_form" else (None, (), {}, output)
    if device_rows is not None and src.bool(0.2):
        # an object the CPU cannot read: routed to device_rows, never read by C
        class OnDevice:
            def __dlpack_device__(self):
                return (fk.CUDA, 0)

        try:
            hook(None, (), OnDevice())
            check(not stop, "a stop=True hook returned normally")
        except _core.StopForward:
            check(stop, "StopForward from a hook without stop=True")
        check(routed and routed[-1][0] == slot, "device_rows was not called for an unreadable tensor")
        routed.clear()
    calls = hook.calls
    try:
        hook(*args)
    except _core.StopForward:
        check(stop, "StopForward from a hook without stop=True")
        check(not routed, "a CPU-readable tensor went to device_rows")
        return
    finally:
        check(hook.calls == calls + 1, "hook.calls did not count the call")
    check(not stop, "a stop=True hook returned normally")
    check(not routed, "a CPU-readable tensor went to device_rows")


def op_load_state(src, rng, registry, acc, model):
    shape = (model.slots, model.groups, model.hidden)
    sums_shape = shape if src.bool(0.8) else src.pick(((model.slots, model.groups), shape[::-1], (1,) + shape))
    sums_dtype = "float64" if src.bool(0.85) else src.pick(("float32", "int64", "float16"))
    sums_view = strided_numpy(src, rng, sums_shape, sums_dtype)
    sums_obj, sums_ok, sums_view = wrap(src, rng, registry, sums_view, role="sums")
    counts_shape = shape[:2] if src.bool(0.85) else src.pick((shape, (model.slots,), shape[:2][::-1] + (1,)))
    counts_dtype = src.pick(INT_DTYPES + ("float64",) if src.bool(0.1) else INT_DTYPES)
    values = [src.pick((0, 1, 5, 1000, -1)) for _ in range(int(np.prod(counts_shape)))]
    counts_view = strided_numpy(src, rng, counts_shape, counts_dtype, values=values)
    counts_obj, counts_ok, counts_view = wrap(src, rng, registry, counts_view, role="counts")
    valid = (sums_ok and counts_ok and sums_dtype == "float64" and tuple(sums_view.shape) == shape
             and counts_dtype != "float64" and tuple(counts_view.shape) == shape[:2]
             and bool((as_int64(counts_view) >= 0).all()))
    try:
        acc.load_state(sums_obj, counts_obj)
    except EXPECTED:
        check(not valid, "load_state raised on valid state")
        return
    check(valid, "load_state accepted invalid state")
    model.sums = as_float64(sums_view).reshape(shape).copy()
    model.counts = as_int64(counts_view).reshape(shape[:2]).copy()


def op_merge(src, rng, registry, acc, model):
    same = src.bool(0.7)
    hidden = model.hidden if same else model.hidden + 1
    other = _core.Accumulator(model.slots, hidden, model.groups, sample_rows=src.int(0, 2))
    other_model = ModelAccumulator(model.slots, hidden, model.groups, 0)
    for _ in range(src.int(0, 2)):
        op_add(src, rng, registry, other, other_model)
    target = other if src.bool(0.9) else acc if src.bool(0.5) else object()
    try:
        acc.merge(target)
    except EXPECTED:
        check(not (same and target is other), "merge raised on a valid other")
        return
    check(same and target is other, "merge accepted an invalid other")
    model.sums = model.sums + other_model.sums
    model.counts = model.counts + other_model.counts


def op_samples(src, acc, model):
    slot = src.pick((0, model.slots - 1, model.slots, -1, 2**70, "0"))
    try:
        if isinstance(slot, int) and 0 <= slot < model.slots:
            model.check_samples(acc, slot)
        else:
            acc.samples(slot)
            check(False, f"samples({slot!r}) did not raise")
    except EXPECTED:
        check(not (isinstance(slot, int) and 0 <= slot < model.slots), f"samples({slot}) raised")


def op_dlpack_info(src, rng, registry):
    ndim = src.int(0, 4)
    shape = tuple(src.int(0, 3) for _ in range(ndim))
    dtype = src.pick(("float16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8", "bool",
                      "uint16", "complex64"))
    view = strided_numpy(src, rng, shape, dtype)
    if dtype in ("uint16", "complex64"):
        try:
            _core.dlpack_info(view)
        except EXPECTED:
            return
        check(False, f"dlpack_info accepted {dtype}")
    obj, valid, fake = make_fake(src, rng, registry, view, role="info")
    try:
        info = _core.dlpack_info(obj)
    except EXPECTED:
        check(not valid, f"dlpack_info raised on a valid capsule ({fake.info})")
        return
    check(valid, f"dlpack_info accepted a corrupt capsule ({fake.info})")
    check(info["shape"] == shape, f"dlpack_info shape {info['shape']} != {shape}")
    strides = tuple(s // view.dtype.itemsize for s in view.strides)
    if fake._strides is None:
        # row-major fill-in; zero-size dims count as 1 in the running product
        running, filled = 1, []
        for n in reversed(shape):
            filled.append(running)
            running *= n if n > 0 else 1
        strides = tuple(reversed(filled))
    check(info["strides"] == strides, f"dlpack_info strides {info['strides']} != {strides}")
    check(info["dtype"] == dtype, f"dlpack_info dtype {info['dtype']} != {dtype}")
    check(info["device_type"] == fake.managed.dl_tensor.device.device_type, "dlpack_info device")
    check(info["versioned"] == fake.versioned, "dlpack_info versioned")


def op_producer(src, rng, registry, acc, model):
    """Producers that fail, return non-capsules, re-enter the accumulator, or odd devices."""
    what = src.pick(("raise_type", "raise_buffer", "non_capsule", "reenter", "device_odd", "no_dlpack"))
    rows = src.int(1, 3)
    groups = np.zeros(rows, dtype=np.int64)
    act = np.ones((rows, model.hidden), dtype=np.float32)
    if what == "raise_type":
        # TypeError to the max_version request only: the retry without keywords succeeds
        producer = fk.Producer(act.__dlpack__(), accepts_max_version=False)
        acc.add(0, producer, groups)
        reference_add(model, 0, act.astype(np.float64), groups, None, None)
        check(producer.requests == [{"max_version": (1, 1)}, {}], f"requests {producer.requests}")
        return
    if what == "raise_buffer":
        producer = fk.Producer(None, error=BufferError("producer refuses"))
    elif what == "non_capsule":
        producer = fk.Producer(src.pick((42, "capsule", act, None)))
    elif what == "no_dlpack":
        producer = src.pick((object(), 3.5, "tensor", [1.0] * model.hidden))
    elif what == "device_odd":
        producer = fk.Producer(act.__dlpack__(), device=src.pick(((), ("a", 0), 5, (2**70, 0), (None,))))
        hook = _core.CaptureHook(acc, 0, device_rows=lambda s, t: None)
        acc.set_batch(groups)
        model.batch = (groups, None, None, "rows")
        try:
            hook(None, (), producer)
        except EXPECTED:
            return
        check(False, "an odd __dlpack_device__ was accepted")
        return
    else:  # re-enter the accumulator from __dlpack__
        class Reentrant:
            def __dlpack__(self, **kwargs):
                acc.state()
                return act.__dlpack__(**kwargs)

        producer = Reentrant()
    target = src.pick(("activations", "groups"))
    try:
        if target == "activations":
            acc.add(0, producer, groups)
        else:
            acc.add(0, act, producer)
    except EXPECTED:
        return
    check(False, f"producer {what} did not raise")


# ------------------------------------------------------------------------------- one input


def one_input(src) -> None:
    rng = np.random.default_rng(src.int(0, 2**32 - 1))
    registry = Registry()
    ok = False
    try:
        if src.bool(0.05):
            # constructor arguments, including overflowing sizes
            args = [src.pick((1, 2, 0, -1)) for _ in range(3)]
            args[src.int(0, 2)] = src.pick((1, 2**20, 2**62, -(2**62)))  # at most one large size
            try:
                _core.Accumulator(*args, sample_rows=src.pick((0, 1, -1, 2**62)))
            except EXPECTED:
                pass
            except MemoryError:
                pass  # a size below the overflow guard but above this machine's memory
            ok = True
            return
        slots, hidden, groups = src.int(1, 3), src.int(1, 5), src.int(1, 4)
        sample_rows = src.pick((0, 0, 1, 3))
        acc = _core.Accumulator(slots, hidden, groups, sample_rows=sample_rows, seed=src.int(0, 9))
        model = ModelAccumulator(slots, hidden, groups, sample_rows)
        for step in range(src.int(1, 6)):
            op = src.pick(("add", "add", "add", "batch", "hook", "load_state", "merge", "samples",
                           "info", "producer", "reset", "clear"))
            snapshot = (model.sums.copy(), model.counts.copy())
            if op == "add":
                op_add(src, rng, registry, acc, model)
            elif op == "batch":
                op_add(src, rng, registry, acc, model, batched=True)
            elif op == "hook":
                op_add(src, rng, registry, acc, model, batched=True, hook=True)
            elif op == "load_state":
                op_load_state(src, rng, registry, acc, model)
            elif op == "merge":
                op_merge(src, rng, registry, acc, model)
            elif op == "samples":
                op_samples(src, acc, model)
            elif op == "info":
                op_dlpack_info(src, rng, registry)
            elif op == "producer":
                op_producer(src, rng, registry, acc, model)
            elif op == "reset":
                acc.reset()
                model.sums[...] = 0
                model.counts[...] = 0
                model.offered = [[] for _ in range(slots)]
            else:
                acc.clear_batch()
                model.batch = None
                check(acc.batch_rows is None, "clear_batch left a batch")
            del snapshot
            model.compare(acc, f"after {op} (step {step})")
            if sample_rows:
                model.check_samples(acc, src.int(0, slots - 1))
        ok = True
    finally:
        if ok:  # after a finding, the traceback still holds capsules: do not count deleters
            registry.finish()


# ------------------------------------------------------------------------------- drivers


_RUNS = [0]


def _housekeeping() -> None:
    """Hand-made capsules are kept alive by dlpack_fakes; after each input they are dead, so
    the keep-alive list can be trimmed (after a collection, for capsules caught in cycles)."""
    _RUNS[0] += 1
    if _RUNS[0] % 2000 == 0:
        gc.collect()
        fk._KEEP_ALIVE.clear()


def test_one_input(data: bytes) -> None:
    try:
        one_input(AtherisSource(data))
    except _core.StopForward:
        raise Finding("StopForward escaped") from None
    finally:
        _housekeeping()


def replay(directory: str) -> int:
    """Runs every file of an atheris corpus once (through FuzzedDataProvider)."""
    names = sorted(os.listdir(directory)) if os.path.isdir(directory) else []
    try:
        import atheris  # noqa: F401 - FuzzedDataProvider decodes the corpus files
    except ImportError:
        names = []
    for name in names:
        with open(os.path.join(directory, name), "rb") as f:
            data = f.read()
        try:
            test_one_input(data)
        except Exception as e:
            print(f"FINDING replaying {os.path.join(directory, name)}: {type(e).__name__}: {e}", flush=True)
            raise
    print(f"Replayed {len(names)} corpus input(s) from {directory}, no findings", flush=True)
    return len(names)


def run_random(seconds: float, seed: int, max_runs: int | None = None) -> int:
    start, runs = time.monotonic(), 0
    while time.monotonic() - start < seconds and (max_runs is None or runs < max_runs):
        run_seed = seed + runs
        try:
            one_input(RandomSource(run_seed))
        except Exception as e:
            print(f"FINDING with --random --seed {run_seed} --runs 1: {type(e).__name__}: {e}", flush=True)
            raise
        finally:
            _housekeeping()
        runs += 1
        if runs % 50000 == 0:
            print(f"#{runs} runs, {runs / (time.monotonic() - start):.0f}/s", flush=True)
    elapsed = time.monotonic() - start
    print(f"Done {runs} runs in {elapsed:.0f} second(s) ({runs / max(elapsed, 1e-9):.0f}/s), no findings",
          flush=True)
    return runs


def main(argv: list[str]) -> None:
    if "--random" in argv:
        def value(flag, default):
            return type(default)(argv[argv.index(flag) + 1]) if flag in argv else default
        if "--replay" in argv:
            replay(value("--replay", ""))
        run_random(value("--seconds", 60.0), value("--seed", int(time.time())), value("--runs", 0) or None)
        return
    try:
        import atheris
    except ImportError:
        seconds = next((float(a.split("=", 1)[1]) for a in argv if a.startswith("-max_total_time=")), 60.0)
        print(f"atheris is not installed; running --random for {seconds:.0f} s", flush=True)
        run_random(seconds, int(time.time()))
        return
    atheris.instrument_func(one_input)
    for f in (op_add, build_plan, build_activations, op_hook_call, op_load_state, op_merge, op_samples,
              op_dlpack_info, op_producer, make_fake, wrap):
        atheris.instrument_func(f)
    atheris.Setup(argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
