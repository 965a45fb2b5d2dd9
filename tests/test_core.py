"""Tests of the C extension rotalabs_steer._core (csrc/): DLPack import, row selection,
float64 accumulation, CaptureHook, ownership of producer memory, threads and leaks.

References are float64 NumPy/torch computations. Rows and token indices are compared
exactly: the C code adds rows in batch order into float64, and so do the references
below. Masked means are compared with a tight tolerance (the C code multiplies by 1/n,
NumPy divides), or exactly where the data makes the math exact.
"""

from __future__ import annotations

import gc
import os
import sys
import threading
import tracemalloc

import numpy as np
import pytest
import torch

from rotalabs_steer import _core

_TESTS = os.path.dirname(os.path.abspath(__file__))
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)
import dlpack_fakes as fk  # noqa: E402

RNG_SEED = 1234

# --------------------------------------------------------------------------- helpers


def f64(x) -> np.ndarray:
    """A float64 NumPy copy of a torch tensor or NumPy array."""
    if isinstance(x, torch.Tensor):
        return x.detach().double().numpy()
    return np.asarray(x, dtype=np.float64)


def ints(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().to(torch.int64).numpy()
    return np.asarray(x).astype(np.int64)


def reference(num_slots, hidden, num_groups, calls):
    """float64 sums and int64 counts for a list of (slot, act, groups, index, mask)."""
    sums = np.zeros((num_slots, num_groups, hidden))
    counts = np.zeros((num_slots, num_groups), dtype=np.int64)
    for slot, act, groups, index, mask in calls:
        act = f64(act)
        groups = ints(groups)
        index = None if index is None else ints(index)
        mask = None if mask is None else ints(mask)
        for b, g in enumerate(groups):
            if g < 0:
                continue
            counts[slot, g] += 1
            if index is not None:
                sums[slot, g] += act[b, index[b]]
            elif mask is not None:
                sums[slot, g] += act[b][mask[b] != 0].mean(axis=0)
            else:
                sums[slot, g] += act[b]
    return sums, counts


def dyadic(shape, rng, dtype=np.float32):
    """Values k/16 with |k| <= 255: exact in float16, bfloat16, float32 and float64, so
    their float64 sums are exact in any order."""
    return (rng.integers(-255, 256, size=shape) / 16.0).astype(dtype)


def assert_state(acc, sums, counts, *, exact=True):
    got_sums, got_counts = acc.state()
    assert got_sums.dtype == np.float64 and got_counts.dtype == np.int64
    np.testing.assert_array_equal(got_counts, counts)
    if exact:
        np.testing.assert_array_equal(got_sums, sums)
    else:
        np.testing.assert_allclose(got_sums, sums, rtol=1e-12, atol=1e-12)


@pytest.fixture
def rng():
    return np.random.default_rng(RNG_SEED)


# ====================================================================== 1. producers

FLOAT_CASES = [
    ("numpy", np.float16),
    ("numpy", np.float32),
    ("numpy", np.float64),
    ("torch", torch.float16),
    ("torch", torch.bfloat16),
    ("torch", torch.float32),
    ("torch", torch.float64),
]


def dtype_name(dtype) -> str:
    if isinstance(dtype, torch.dtype):
        return str(dtype).replace("torch.", "")
    return np.dtype(dtype).name


def make_float(producer, dtype, values: np.ndarray):
    if producer == "numpy":
        return values.astype(dtype)
    return torch.from_numpy(values.astype(np.float64)).to(dtype)


@pytest.mark.parametrize("producer,dtype", FLOAT_CASES, ids=lambda v: str(v))
def test_float_dtypes_rows_exact(producer, dtype, rng):
    acts = make_float(producer, dtype, dyadic((7, 5), rng, np.float64))
    groups = np.array([0, 1, -1, 1, 0, 0, -1])
    acc = _core.Accumulator(2, 5)
    acc.add(1, acts, groups)
    sums, counts = reference(2, 5, 2, [(1, acts, groups, None, None)])
    assert counts.sum() == 5
    assert_state(acc, sums, counts)
    assert _core.dlpack_info(acts)["dtype"] == dtype_name(dtype)


@pytest.mark.parametrize("producer,dtype", FLOAT_CASES, ids=lambda v: str(v))
def test_float_dtypes_random_data(producer, dtype, rng):
    """Non-dyadic data: still exact, because the reference adds in the same order."""
    acts = make_float(producer, dtype, rng.standard_normal((9, 4, 6)) * 3)
    groups = np.array([0, 1, 1, -1, 0, 1, 0, 0, 1])
    index = np.array([3, 0, 2, 1, 1, 3, 0, 2, 2])
    acc = _core.Accumulator(1, 6)
    acc.add(0, acts, groups, index=index)
    assert_state(acc, *reference(1, 6, 2, [(0, acts, groups, index, None)]))


INT_CASES = [
    ("numpy", np.int8),
    ("numpy", np.int16),
    ("numpy", np.int32),
    ("numpy", np.int64),
    ("numpy", np.uint8),
    ("torch", torch.int8),
    ("torch", torch.int16),
    ("torch", torch.int32),
    ("torch", torch.int64),
    ("torch", torch.uint8),
]


def make_int(producer, dtype, values):
    values = np.asarray(values)
    if producer == "numpy":
        return values.astype(dtype)
    return torch.from_numpy(values.astype(np.int64)).to(dtype)


def is_unsigned(dtype):
    return dtype in (np.uint8, torch.uint8)


@pytest.mark.parametrize("producer,dtype", INT_CASES, ids=lambda v: str(v))
def test_integer_dtypes_for_groups_and_index(producer, dtype, rng):
    acts = torch.from_numpy(dyadic((6, 5, 3), rng))
    raw_groups = [0, 1, 1, 0, 1, 0] if is_unsigned(dtype) else [0, 1, -1, 0, 1, -1]
    groups = make_int(producer, dtype, raw_groups)
    index = make_int(producer, dtype, [4, 0, 2, 3, 1, 4])
    acc = _core.Accumulator(1, 3)
    acc.add(0, acts, groups, index=index)
    sums, counts = reference(1, 3, 2, [(0, acts, raw_groups, [4, 0, 2, 3, 1, 4], None)])
    assert_state(acc, sums, counts)
    assert _core.dlpack_info(groups)["dtype"] == dtype_name(dtype)


@pytest.mark.parametrize(
    "producer,dtype",
    INT_CASES + [("numpy", np.bool_), ("torch", torch.bool)],
    ids=lambda v: str(v),
)
def test_integer_and_bool_dtypes_for_mask(producer, dtype, rng):
    acts = np.ascontiguousarray(dyadic((4, 6, 3), rng, np.float64))
    raw_mask = np.array(
        [[1, 1, 1, 0, 0, 0], [0, 0, 1, 1, 1, 1], [1, 0, 1, 0, 1, 0], [0, 0, 0, 0, 0, 1]]
    )
    # nonzero values other than 1 count as set tokens too (except for bool)
    scaled = raw_mask * (1 if dtype in (np.bool_, torch.bool) else 3)
    mask = make_int(producer, dtype, scaled)
    groups = np.array([0, 1, 0, 1])
    acc = _core.Accumulator(1, 3)
    acc.add(0, acts, groups, mask=mask)
    sums, counts = reference(1, 3, 2, [(0, acts, groups, None, raw_mask)])
    assert_state(acc, sums, counts, exact=False)
    if dtype in (np.bool_, torch.bool):
        assert _core.dlpack_info(mask)["dtype"] == "bool"


def _all_bits_check(acts_1xn, reference_f64):
    """Adds one row holding every 16-bit pattern and compares it to the reference."""
    n = reference_f64.shape[0]
    acc = _core.Accumulator(1, n, num_groups=1)
    acc.add(0, acts_1xn, np.array([0]))
    got = acc.state()[0][0, 0]
    nan = np.isnan(reference_f64)
    assert 0 < nan.sum() < n
    np.testing.assert_array_equal(np.isnan(got), nan)
    np.testing.assert_array_equal(np.isposinf(got), np.isposinf(reference_f64))
    np.testing.assert_array_equal(np.isneginf(got), np.isneginf(reference_f64))
    # Bit-exact for every non-NaN value. The accumulator starts at +0.0, so -0.0 arrives as
    # +0.0 (0.0 + -0.0 == +0.0): compare against reference + 0.0.
    expected = reference_f64[~nan] + 0.0
    np.testing.assert_array_equal(got[~nan].view(np.uint64), expected.view(np.uint64))


def test_float16_all_bit_patterns_numpy_and_torch():
    bits = np.arange(65536, dtype=np.uint32).astype(np.uint16)
    as_numpy = bits.view(np.float16).reshape(1, -1)
    as_torch = torch.from_numpy(bits.view(np.int16).copy()).view(torch.float16).reshape(1, -1)
    ref = as_torch.double().numpy()[0]
    assert np.isinf(ref).sum() == 2 and (ref[np.isfinite(ref)] != 0).sum() == 65536 - 2 - 2046 - 2
    # subnormals included: the smallest positive half is 2**-24
    assert ref[1] == 2.0**-24
    _all_bits_check(as_numpy, ref)
    _all_bits_check(as_torch, ref)


def test_bfloat16_all_bit_patterns():
    bits = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16)
    as_bf16 = bits.view(torch.bfloat16).reshape(1, -1)
    ref = as_bf16.double().numpy()[0]
    assert np.isinf(ref).sum() == 2
    _all_bits_check(as_bf16, ref)


# ======================================================================== 2. layouts


# name: (base shape, view); every view is [6, 5] and not contiguous
LAYOUTS = {
    "transposed": ((10, 6), lambda b: b.T[:, :5]),
    "step2": ((6, 10), lambda b: b[:, ::2]),
    "offset_slice": ((7, 8), lambda b: b[1:, 3:]),
    "broadcast": ((1, 5), lambda b: np.broadcast_to(b, (6, 5)) if isinstance(b, np.ndarray)
                  else b.expand(6, 5)),
    "broadcast_col": ((6, 1), lambda b: np.broadcast_to(b, (6, 5)) if isinstance(b, np.ndarray)
                      else b.expand(6, 5)),
    # numpy only: torch has no negative strides
    "reversed_hidden": ((6, 10), lambda b: b[:, ::-1][:, :5]),
    "reversed_rows": ((6, 10), lambda b: b[::-1][:, 3:8]),
}


def test_layout_strides_reported_by_dlpack_info():
    x = np.arange(24.0).reshape(4, 6)
    assert _core.dlpack_info(x.T)["strides"] == (1, 6)
    assert _core.dlpack_info(x[:, ::2])["strides"] == (6, 2)
    assert _core.dlpack_info(x[..., ::-1])["strides"] == (6, -1)
    assert _core.dlpack_info(x[1:, 2:])["shape"] == (3, 4)
    assert _core.dlpack_info(np.broadcast_to(x[0], (5, 6)))["strides"] == (0, 1)
    t = torch.arange(24.0).reshape(4, 6)
    assert _core.dlpack_info(t.t())["strides"] == (1, 6)
    assert _core.dlpack_info(t[0].expand(3, 6))["strides"] == (0, 1)
    info = _core.dlpack_info(t[1:, 2:])
    assert info["shape"] == (3, 4) and info["strides"] == (6, 1) and info["device_type"] == 1


@pytest.mark.parametrize(
    "name,producer",
    [(n, p) for n in sorted(LAYOUTS) for p in ("numpy", "torch")
     if not (p == "torch" and n.startswith("reversed"))],  # torch has no negative strides
)
def test_noncontiguous_rows(name, producer, rng):
    shape, view = LAYOUTS[name]
    base = dyadic(shape, rng, np.float64)
    acts = view(base if producer == "numpy" else torch.from_numpy(base))
    assert tuple(acts.shape) == (6, 5)
    if producer == "numpy":
        assert not acts.flags["C_CONTIGUOUS"]
    else:
        assert not acts.is_contiguous()
    groups = np.array([0, 1, 0, -1, 1, 0])
    acc = _core.Accumulator(1, 5)
    acc.add(0, acts, groups)
    assert_state(acc, *reference(1, 5, 2, [(0, acts, groups, None, None)]))


def test_noncontiguous_3d_index_and_mask(rng):
    # activations [batch, seq, hidden] as a permuted view of [seq, hidden, batch]
    base = torch.from_numpy(dyadic((7, 4, 5), rng))
    acts = base.permute(2, 0, 1)
    assert acts.shape == (5, 7, 4) and not acts.is_contiguous()
    groups_base = np.array([0, 9, 1, 9, -1, 9, 1, 9, 0, 9])
    groups = groups_base[::2]  # strided groups
    index = torch.tensor([[6, 0], [0, 0], [3, 0], [5, 0], [2, 0]])[:, 0]  # strided index
    acc = _core.Accumulator(1, 4)
    acc.add(0, acts, groups, index=index)
    sums, counts = reference(1, 4, 2, [(0, acts, groups, index, None)])
    assert_state(acc, sums, counts)

    # transposed mask [seq, batch].T, and numpy activations with negative seq stride
    mask_t = np.array(
        [[1, 0, 1, 1, 0], [1, 1, 0, 1, 0], [0, 1, 0, 1, 0], [0, 1, 0, 1, 1], [0, 0, 0, 1, 1],
         [0, 0, 1, 0, 1], [0, 0, 1, 0, 1]],
        dtype=np.int8,
    )
    mask = mask_t.T
    acts_np = np.ascontiguousarray(dyadic((5, 7, 4), rng, np.float64))[:, ::-1, :]
    acc.reset()
    acc.add(0, acts_np, groups, mask=mask)
    sums, counts = reference(1, 4, 2, [(0, acts_np, groups, None, mask)])
    assert_state(acc, sums, counts, exact=False)


def test_zero_strides_torch_expand_3d(rng):
    row = torch.from_numpy(dyadic((1, 1, 3), rng))
    acts = row.expand(4, 8, 3)  # all strides zero but the last
    assert acts.stride() == (0, 0, 1)
    acc = _core.Accumulator(1, 3)
    # 8 tokens: the mean of equal dyadic values is exact
    acc.add(0, acts, torch.tensor([0, 1, 1, 0]), mask=torch.ones(4, 8, dtype=torch.bool))
    expected = np.repeat(f64(row)[0], 2, axis=0) * 2
    assert_state(acc, expected[None], np.array([[2, 2]]))


def test_size_zero_inputs():
    acc = _core.Accumulator(1, 4)
    acc.add(0, np.zeros((1, 4)) + 1, np.array([1]))
    before = acc.state()
    # batch 0
    acc.add(0, np.zeros((0, 4), np.float32), np.zeros(0, np.int64))
    acc.add(0, torch.zeros(0, 3, 4), torch.zeros(0, dtype=torch.int64),
            index=torch.zeros(0, dtype=torch.int64))
    acc.add(0, torch.zeros(0, 3, 4), torch.zeros(0, dtype=torch.int64),
            mask=torch.zeros(0, 3, dtype=torch.bool))
    # all rows skipped
    acc.add(0, np.ones((3, 4)), np.array([-1, -1, -1]))
    # all rows skipped, seq 0: empty [3, 0, 4] tensor with empty masks / any index
    acc.add(0, np.zeros((3, 0, 4)), np.array([-1, -1, -1]), mask=np.zeros((3, 0), bool))
    acc.add(0, np.zeros((3, 0, 4)), np.array([-1, -1, -1]), index=np.array([0, 5, -3]))
    after = acc.state()
    np.testing.assert_array_equal(after[0], before[0])
    np.testing.assert_array_equal(after[1], before[1])
    assert after[1].tolist() == [[0, 1]]
    acc.set_batch(np.zeros(0, np.int64))
    assert acc.batch_rows == 0
    acc.add_batch(0, np.zeros((0, 4)))
    np.testing.assert_array_equal(acc.state()[1], before[1])


@pytest.mark.parametrize("producer", ["numpy", "torch"])
def test_versioned_and_legacy_capsules(producer, rng):
    values = dyadic((3, 4), rng)
    x = values if producer == "numpy" else torch.from_numpy(values)
    assert _core.dlpack_info(x)["versioned"] is True  # we ask with max_version
    legacy = x.__dlpack__()
    versioned = x.__dlpack__(max_version=(1, 0))
    assert fk.capsule_name(legacy) == "dltensor"
    assert fk.capsule_name(versioned) == "dltensor_versioned"
    assert _core.dlpack_info(legacy)["versioned"] is False
    assert _core.dlpack_info(versioned)["versioned"] is True
    assert fk.capsule_name(legacy) == "used_dltensor"
    assert fk.capsule_name(versioned) == "used_dltensor_versioned"

    acc = _core.Accumulator(1, 4)
    groups = np.array([0, 1, 0])
    acc.add(0, x.__dlpack__(), groups)
    acc.add(0, x.__dlpack__(max_version=(1, 0)), groups.__dlpack__())
    acc.add(0, x, groups.__dlpack__(max_version=(1, 0)))
    sums, counts = reference(1, 4, 2, [(0, x, groups, None, None)] * 3)
    assert_state(acc, sums, counts)


def test_capsule_consumed_once():
    x = np.ones((2, 3))
    cap = x.__dlpack__(max_version=(1, 0))
    _core.dlpack_info(cap)
    with pytest.raises(BufferError, match="used_dltensor_versioned"):
        _core.dlpack_info(cap)


def test_producer_asked_for_max_version_then_fallback():
    fake = fk.FakeTensor(np.arange(6.0).reshape(2, 3), versioned=True)
    producer = fk.Producer(fake.take_capsule())
    assert _core.dlpack_info(producer)["versioned"] is True
    assert producer.requests == [{"max_version": (1, 1)}]

    # an older producer that rejects the keyword with TypeError: retried without keywords
    fake = fk.FakeTensor(np.arange(6.0).reshape(2, 3), versioned=False)
    old = fk.Producer(fake.take_capsule(), accepts_max_version=False)
    acc = _core.Accumulator(1, 3)
    acc.add(0, old, np.array([1, 1]))
    assert old.requests == [{"max_version": (1, 1)}, {}]
    assert fake.deleter_calls == 1
    np.testing.assert_array_equal(acc.state()[0][0, 1], [3.0, 5.0, 7.0])


def test_producer_errors_other_than_typeerror_are_not_retried():
    broken = fk.Producer(None, error=BufferError("cannot export"))
    with pytest.raises(BufferError, match="cannot export"):
        _core.dlpack_info(broken)
    assert broken.requests == [{"max_version": (1, 1)}]
    # torch refuses tensors that require grad (DESIGN rule 9): its error comes through
    acc = _core.Accumulator(1, 3)
    with pytest.raises((BufferError, RuntimeError), match="detach"):
        acc.add(0, torch.ones(2, 3, requires_grad=True), np.array([0, 1]))
    assert acc.state()[1].sum() == 0


def test_producer_returning_non_capsule():
    class Bad:
        def __dlpack__(self, **kwargs):
            return 42

    with pytest.raises(TypeError, match="not a capsule"):
        _core.Accumulator(1, 3).add(0, Bad(), np.array([0]))


# ====================================================================== 3. semantics


def test_last_first_explicit_index(rng):
    acts = torch.from_numpy(rng.standard_normal((4, 6, 5)).astype(np.float32))
    groups = torch.tensor([0, 1, 1, 0])
    lengths = torch.tensor([6, 3, 5, 1])
    acc = _core.Accumulator(3, 5)
    acc.add(0, acts, groups, index=lengths - 1)  # last token, right padding
    acc.add(1, acts, groups, index=torch.zeros(4, dtype=torch.int64))  # first token
    explicit = torch.tensor([2, 0, 4, 5])
    acc.add(2, acts, groups, index=explicit)
    a = f64(acts)
    sums, counts = acc.state()
    np.testing.assert_array_equal(counts, [[2, 2]] * 3)
    np.testing.assert_array_equal(sums[0, 0], a[0, 5] + a[3, 0])
    np.testing.assert_array_equal(sums[0, 1], a[1, 2] + a[2, 4])
    np.testing.assert_array_equal(sums[1, 0], a[0, 0] + a[3, 0])
    np.testing.assert_array_equal(sums[1, 1], a[1, 0] + a[2, 0])
    np.testing.assert_array_equal(sums[2, 0], a[0, 2] + a[3, 5])
    np.testing.assert_array_equal(sums[2, 1], a[1, 0] + a[2, 4])
    # left padding: the last token is always seq - 1
    acc.reset()
    acc.add(0, acts, groups, index=torch.full((4,), 5))
    np.testing.assert_array_equal(acc.state()[0][0], [a[0, 5] + a[3, 5], a[1, 5] + a[2, 5]])


@pytest.mark.parametrize("padding", ["right", "left"])
def test_masked_mean(padding, rng):
    batch, seq, hidden = 5, 7, 6
    acts = torch.from_numpy(rng.standard_normal((batch, seq, hidden)))
    lengths = [7, 3, 1, 5, 2]
    mask = torch.zeros(batch, seq, dtype=torch.int64)
    for b, n in enumerate(lengths):
        if padding == "right":
            mask[b, :n] = 1
        else:
            mask[b, seq - n:] = 1
    groups = torch.tensor([0, 1, 0, -1, 1])
    acc = _core.Accumulator(1, hidden)
    acc.add(0, acts, groups, mask=mask)
    a = f64(acts)
    m = mask.numpy().astype(bool)
    expected = np.zeros((2, hidden))
    for b, g in enumerate(groups.tolist()):
        if g >= 0:
            expected[g] += a[b][m[b]].mean(axis=0)
    sums, counts = acc.state()
    np.testing.assert_array_equal(counts, [[2, 2]])
    np.testing.assert_allclose(sums[0], expected, rtol=1e-14, atol=1e-15)
    # torch's own float64 masked mean agrees as well
    tm = (acts * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    np.testing.assert_allclose(sums[0, 0], (tm[0] + tm[2]).numpy(), rtol=1e-13)
    # a masked mean over a single token is that token exactly
    acc.reset()
    one = torch.zeros(batch, seq, dtype=torch.bool)
    one[:, 3] = True
    acc.add(0, acts, torch.tensor([0, -1, -1, -1, 1]), mask=one)
    np.testing.assert_array_equal(acc.state()[0][0], [a[0, 3], a[4, 3]])


def test_group_skipping_counts_and_groups(rng):
    acts = dyadic((8, 3), rng, np.float64)
    groups = np.array([2, -1, 0, 2, 2, -1, 1, 0])
    acc = _core.Accumulator(2, 3, num_groups=3)
    assert (acc.num_slots, acc.num_groups, acc.hidden) == (2, 3, 3)
    acc.add(1, acts, groups)
    acc.add(1, acts[:4], groups[:4])
    sums, counts = acc.state()
    np.testing.assert_array_equal(counts, [[0, 0, 0], [2 + 1, 1, 3 + 2]])
    np.testing.assert_array_equal(sums[0], 0)
    np.testing.assert_array_equal(sums[1, 0], acts[2] + acts[7] + acts[2])
    np.testing.assert_array_equal(sums[1, 1], acts[6])
    np.testing.assert_array_equal(sums[1, 2], acts[0] + acts[3] + acts[4] + acts[0] + acts[3])
    # a skipped row may have an out-of-range index and an empty mask
    acc.reset()
    acc.add(0, acts[:, None, :].repeat(2, 1), np.array([-1] * 7 + [1]),
            index=np.array([99, -5, 0, 0, 0, 0, 0, 1]))
    acc.add(0, acts[:2, None, :], np.array([-1, 0]), mask=np.array([[0], [1]]))
    np.testing.assert_array_equal(acc.state()[1], [[1, 1, 0], [0, 0, 0]])
    np.testing.assert_array_equal(acc.state()[0][0, :2], [acts[1], acts[7]])


def test_merge_of_halves_equals_all(rng):
    acts = rng.standard_normal((10, 4, 5)).astype(np.float32)
    groups = np.array([0, 1, 1, 0, -1, 1, 0, 0, 1, 1])
    mask = (rng.random((10, 4)) < 0.6).astype(np.uint8)
    mask[:, 0] = 1
    whole, first, second = (_core.Accumulator(2, 5) for _ in range(3))
    whole.add(1, acts[:5], groups[:5], mask=mask[:5])
    whole.add(1, acts[5:], groups[5:], mask=mask[5:])
    whole.add(0, acts, groups, index=np.arange(10) % 4)
    first.add(1, acts[:5], groups[:5], mask=mask[:5])
    first.add(0, acts[:5], groups[:5], index=np.arange(5) % 4)
    second.add(1, acts[5:], groups[5:], mask=mask[5:])
    second.add(0, acts[5:], groups[5:], index=np.arange(5, 10) % 4)
    first.merge(second)
    assert_state(first, *whole.state(), exact=False)
    np.testing.assert_array_equal(first.state()[1], whole.state()[1])
    # merge leaves `other` alone
    np.testing.assert_array_equal(second.state()[1], [[2, 3], [2, 3]])
    # dyadic data: merge is exact
    x = dyadic((6, 5), rng, np.float64)
    g = np.array([0, 1, 0, 1, 1, 0])
    a, b, c = (_core.Accumulator(1, 5) for _ in range(3))
    a.add(0, x, g)
    b.add(0, x[:3], g[:3])
    c.add(0, x[3:], g[3:])
    b.merge(c)
    assert_state(b, *a.state())


def test_merge_errors():
    acc = _core.Accumulator(1, 3)
    with pytest.raises(TypeError, match="Accumulator"):
        acc.merge(np.zeros((1, 2, 3)))
    with pytest.raises(ValueError, match="shape"):
        acc.merge(_core.Accumulator(1, 4))
    with pytest.raises(ValueError, match="shape"):
        acc.merge(_core.Accumulator(1, 3, num_groups=3))
    with pytest.raises(ValueError, match="itself"):
        acc.merge(acc)


def test_state_copies_load_state_roundtrip_and_reset(rng):
    acc = _core.Accumulator(3, 4, num_groups=2)
    acc.add(2, rng.standard_normal((6, 4)), np.array([0, 1, 1, -1, 0, 1]))
    acc.add(0, rng.standard_normal((2, 4)).astype(np.float32), np.array([1, 1]))
    sums, counts = acc.state()
    sums[:] = 123.0  # copies: changing them changes nothing
    counts[:] = 7
    sums, counts = acc.state()
    assert sums.shape == (3, 2, 4) and counts.shape == (3, 2)
    assert counts.tolist() == [[0, 2], [0, 0], [2, 3]]

    other = _core.Accumulator(3, 4)
    other.load_state(sums, counts)
    assert_state(other, sums, counts)
    assert_state(acc, sums, counts)  # unchanged by load_state elsewhere

    # torch inputs, non-contiguous sums, int32 counts
    transposed = np.ascontiguousarray(sums.transpose(2, 1, 0)).transpose(2, 1, 0)
    other.reset()
    np.testing.assert_array_equal(other.state()[0], 0)
    np.testing.assert_array_equal(other.state()[1], 0)
    other.load_state(torch.from_numpy(transposed), torch.from_numpy(counts.astype(np.int32)))
    assert_state(other, sums, counts)

    # special values round trip bit for bit
    special = np.full((3, 2, 4), -0.0)
    special[0, 0, :3] = [np.inf, -np.inf, 5e-324]
    other.load_state(special, np.full((3, 2), 2**40))
    got = other.state()
    np.testing.assert_array_equal(got[0].view(np.uint64), special.view(np.uint64))
    assert got[1].max() == 2**40

    # further adds continue from the loaded state
    acc2 = _core.Accumulator(3, 4)
    acc2.load_state(*acc.state())
    extra = np.ones((1, 4))
    acc2.add(1, extra, np.array([0]))
    acc.add(1, extra, np.array([0]))
    assert_state(acc2, *acc.state())


def test_load_state_errors():
    acc = _core.Accumulator(2, 3)
    good_sums, good_counts = acc.state()
    with pytest.raises(TypeError, match="float64"):
        acc.load_state(good_sums.astype(np.float32), good_counts)
    with pytest.raises(TypeError, match="integers"):
        acc.load_state(good_sums, good_counts.astype(np.float64))
    with pytest.raises(ValueError, match=r"sums must have shape \(2, 2, 3\)"):
        acc.load_state(np.zeros((2, 2, 4)), good_counts)
    with pytest.raises(ValueError, match=r"counts must have shape \(2, 2\)"):
        acc.load_state(good_sums, np.zeros((2, 3), np.int64))
    with pytest.raises(ValueError, match="negative"):
        acc.load_state(good_sums, -np.ones((2, 2), np.int64))
    with pytest.raises(TypeError, match="sums"):
        acc.load_state([0.0], good_counts)
    # a failed load leaves the state alone
    np.testing.assert_array_equal(acc.state()[1], 0)


def test_constructor_errors_and_properties():
    with pytest.raises(ValueError, match=">= 1"):
        _core.Accumulator(0, 3)
    with pytest.raises(ValueError, match=">= 1"):
        _core.Accumulator(1, 0)
    with pytest.raises(ValueError, match=">= 1"):
        _core.Accumulator(1, 3, num_groups=0)
    with pytest.raises(OverflowError):
        _core.Accumulator(2**40, 2**20)
    acc = _core.Accumulator(4, 7, 5)
    assert (acc.num_slots, acc.hidden, acc.num_groups, acc.batch_rows) == (4, 7, 5, None)


def test_set_batch_add_batch_equals_add(rng):
    acts = torch.from_numpy(rng.standard_normal((5, 6, 4)).astype(np.float32))
    groups = torch.tensor([1, 0, -1, 1, 0])
    index = torch.tensor([5, 2, 0, 1, 3])
    mask = torch.from_numpy((rng.random((5, 6)) < 0.5))
    mask[:, 2] = True
    for kw in ({"index": index}, {"mask": mask}, {}):
        x = acts if kw else acts[:, 0]
        direct, planned = _core.Accumulator(2, 4), _core.Accumulator(2, 4)
        direct.add(1, x, groups, **kw)
        direct.add(0, x * 2, groups, **kw)
        planned.set_batch(groups, **kw)
        assert planned.batch_rows == 5
        planned.add_batch(1, x)
        planned.add_batch(0, x * 2)
        assert_state(planned, *direct.state())
    planned.clear_batch()
    assert planned.batch_rows is None
    with pytest.raises(RuntimeError, match="set_batch"):
        planned.add_batch(0, acts[:, 0])
    # a failed set_batch keeps the previous plan
    planned.set_batch(groups)
    with pytest.raises(ValueError):
        planned.set_batch(torch.tensor([0, 7]))
    assert planned.batch_rows == 5


def test_add_batch_without_set_batch():
    acc = _core.Accumulator(1, 3)
    with pytest.raises(RuntimeError, match="set_batch"):
        acc.add_batch(0, np.ones((2, 3)))
    hook = _core.CaptureHook(acc, 0)
    with pytest.raises(RuntimeError, match="set_batch"):
        hook(None, (), np.ones((2, 3)))


def test_capture_hook_tuple_output_and_forms(rng):
    acts = torch.from_numpy(rng.standard_normal((3, 4, 5)).astype(np.float32))
    groups = torch.tensor([0, 1, 0])
    index = torch.tensor([3, 1, 0])
    acc = _core.Accumulator(2, 5)
    acc.set_batch(groups, index=index)
    hook = _core.CaptureHook(acc, 1)
    assert (hook.slot, hook.stop, hook.accumulator, hook.calls) == (1, False, acc, 0)
    assert hook(None, (acts,), (acts, "cache", None)) is None  # tuple: first item
    hook(None, (acts,), {"use_cache": False}, [acts * 3])  # 4-argument form, list output
    hook(None, (), acts)  # a bare tensor
    assert hook.calls == 3
    ref = reference(2, 5, 2, [(1, a, groups, index, None) for a in (acts, acts * 3, acts)])
    assert_state(acc, *ref)
    with pytest.raises(TypeError, match="arguments"):
        hook(None, acts)
    with pytest.raises(TypeError, match="positional"):
        hook(None, (), output=acts)
    with pytest.raises(ValueError, match="empty tuple"):
        hook(None, (), ())
    with pytest.raises(TypeError, match="Accumulator"):
        _core.CaptureHook(object(), 0)
    with pytest.raises(TypeError, match="callable"):
        _core.CaptureHook(acc, 0, device_rows=3)


def test_capture_hook_stop_raises_after_the_add(rng):
    # a control-flow signal: `except Exception` in user code must not catch it
    assert issubclass(_core.StopForward, BaseException)
    assert not issubclass(_core.StopForward, Exception)
    acts = torch.from_numpy(rng.standard_normal((2, 3, 4)).astype(np.float32))
    acc = _core.Accumulator(2, 4)
    acc.set_batch(torch.tensor([1, 0]), index=torch.tensor([2, 2]))
    hook = _core.CaptureHook(acc, 0, stop=True)
    assert hook.stop is True
    with pytest.raises(_core.StopForward):
        hook(None, (), (acts,))
    assert hook.calls == 1
    a = f64(acts)
    np.testing.assert_array_equal(acc.state()[0][0], [a[1, 2], a[0, 2]])
    np.testing.assert_array_equal(acc.state()[1], [[1, 1], [0, 0]])
    # a failing add raises its own error, not StopForward
    with pytest.raises(ValueError, match="hidden size"):
        hook(None, (), torch.zeros(2, 3, 5))
    np.testing.assert_array_equal(acc.state()[1], [[1, 1], [0, 0]])


def test_capture_hook_on_torch_modules(rng):
    torch.manual_seed(0)
    blocks = torch.nn.ModuleList([torch.nn.Linear(4, 4) for _ in range(3)])

    def forward(x):
        for block in blocks:
            x = block(x)
        return x

    acc = _core.Accumulator(2, 4)
    hooks = [_core.CaptureHook(acc, 0), _core.CaptureHook(acc, 1, stop=True)]
    handles = [blocks[0].register_forward_hook(hooks[0]), blocks[1].register_forward_hook(hooks[1])]
    x = torch.from_numpy(rng.standard_normal((3, 5, 4)).astype(np.float32))
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
    acc.set_batch(torch.tensor([0, 1, 1]), mask=mask)
    calls = []
    blocks[2].register_forward_hook(lambda *a: calls.append(a))
    try:
        with torch.inference_mode(), pytest.raises(_core.StopForward):
            forward(x)
    finally:
        for h in handles:
            h.remove()
    assert [h.calls for h in hooks] == [1, 1]
    with torch.inference_mode():
        h0 = blocks[0](x)
        h1 = blocks[1](h0)
    assert calls == []  # the stop hook ended the forward before block 2
    expected = reference(2, 4, 2, [(0, h0, [0, 1, 1], None, mask), (1, h1, [0, 1, 1], None, mask)])
    assert_state(acc, *expected, exact=False)


def test_stop_forward_passes_through_except_exception(rng):
    # user code between the hook and the caller that handles errors with `except Exception`
    # (a wrapper module, a forward hook) must not end the early stop
    class Guarded(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner
            self.swallowed = 0

        def forward(self, x):
            try:
                return self.inner(x)
            except Exception:
                self.swallowed += 1
                return x

    torch.manual_seed(0)
    block, after = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
    guarded = Guarded(block)
    model = torch.nn.Sequential(guarded, after)
    ran_after = []
    after.register_forward_hook(lambda *a: ran_after.append(1))
    acc = _core.Accumulator(1, 4)
    acc.set_batch(torch.tensor([0, 1]))
    block.register_forward_hook(_core.CaptureHook(acc, 0, stop=True))

    x = torch.from_numpy(rng.standard_normal((2, 4)).astype(np.float32))
    with torch.inference_mode(), pytest.raises(_core.StopForward):
        model(x)
    assert guarded.swallowed == 0 and ran_after == []
    np.testing.assert_array_equal(acc.state()[1], [[1, 1]])

    # a hook that calls another hook inside `except Exception` does not swallow it either
    stop = _core.CaptureHook(acc, 0, stop=True)

    def wrapping_hook(module, args, output):
        try:
            stop(module, args, output)
        except Exception:
            pytest.fail("StopForward caught by except Exception")

    with pytest.raises(_core.StopForward):
        wrapping_hook(block, (x,), x)


class FakeDeviceTensor:
    """A tensor on a device the CPU cannot read: only __dlpack_device__ is allowed."""

    def __init__(self, device=(fk.CUDA, 0)):
        self.device = device
        self.dlpack_calls = 0

    def __dlpack_device__(self):
        return self.device

    def __dlpack__(self, **kwargs):
        self.dlpack_calls += 1
        raise AssertionError("must not be read on the host")


def test_capture_hook_device_rows_routing(rng):
    acc = _core.Accumulator(3, 4)
    acc.set_batch(np.array([0, 1]))
    seen = []
    hook = _core.CaptureHook(acc, 2, device_rows=lambda slot, t: seen.append((slot, t)))
    on_gpu = FakeDeviceTensor()
    hook(None, (), (on_gpu, None))
    assert len(seen) == 1 and seen[0][0] == 2 and seen[0][1] is on_gpu
    assert on_gpu.dlpack_calls == 0
    np.testing.assert_array_equal(acc.state()[1], 0)

    # CPU tensors go straight to the accumulator, even with device_rows set
    cpu = torch.from_numpy(dyadic((2, 4), rng))
    hook(None, (), cpu)
    assert len(seen) == 1
    np.testing.assert_array_equal(acc.state()[0][2], f64(cpu))

    # CUDA-host (3) and CUDA-managed (13) memory is host readable: read directly
    for device in (fk.CUDA_HOST, fk.CUDA_MANAGED):
        data = dyadic((2, 4), rng)
        fake = fk.FakeTensor(data, device=(device, 0))
        producer = fk.Producer(fake.take_capsule(), device=(device, 0))
        acc.reset()
        hook(None, (), producer)
        assert len(seen) == 1 and fake.deleter_calls == 1
        np.testing.assert_array_equal(acc.state()[0][2], data.astype(np.float64))

    # with stop, device rows are also followed by StopForward
    stopper = _core.CaptureHook(acc, 1, stop=True, device_rows=lambda s, t: seen.append((s, t)))
    with pytest.raises(_core.StopForward):
        stopper(None, (), FakeDeviceTensor((fk.CUDA, 1)))
    assert seen[-1][0] == 1 and stopper.calls == 1
    # without device_rows the device tensor reaches the DLPack reader
    plain = _core.CaptureHook(acc, 0)
    gpu = FakeDeviceTensor()
    with pytest.raises(AssertionError, match="host"):
        plain(None, (), gpu)
    assert gpu.dlpack_calls == 1
    # an error raised by device_rows propagates
    failing = _core.CaptureHook(acc, 0, device_rows=lambda s, t: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        failing(None, (), FakeDeviceTensor())


_LIST_OUTPUT_UAF = """
import numpy as np
from rotalabs_steer import _core
acc = _core.Accumulator(1, 3)
acc.set_batch(np.array([0]))
class Output:
    def __init__(self, out):
        self.out = out
    def __dlpack_device__(self):
        out = self.out
        del self.out
        out.clear()  # drops the only reference to self
        return (1, 0)
    def __dlpack__(self, **kwargs):
        return np.ones((1, 3)).__dlpack__(**kwargs)
hook = _core.CaptureHook(acc, 0, device_rows=lambda slot, t: None)
out = []
out.append(Output(out))
hook(None, (), out)
print("counts", acc.state()[1].tolist())
"""


def test_capture_hook_list_output_stays_alive_while_used():
    import subprocess

    env = dict(os.environ, PYTHONPATH=os.path.dirname(_TESTS))
    result = subprocess.run([sys.executable, "-c", _LIST_OUTPUT_UAF], capture_output=True,
                            text=True, timeout=60, env=env, cwd=os.path.dirname(_TESTS))
    assert result.returncode == 0, (result.returncode, result.stderr[-500:])
    assert result.stdout.strip() == "counts [[1, 0]]"


# ===================================================== 4. ownership: deleter exactly once


@pytest.mark.parametrize("versioned", [True, False], ids=["versioned", "legacy"])
def test_deleter_once_after_success(versioned, rng):
    data = dyadic((3, 4), rng)
    fake = fk.FakeTensor(data, versioned=versioned)
    cap = fake.take_capsule()
    acc = _core.Accumulator(1, 4)
    acc.add(0, cap, np.array([0, 1, 1]))
    assert fake.deleter_calls == 1
    assert fake.deleter_args == [fake.address]
    assert fk.capsule_name(cap) == ("used_dltensor_versioned" if versioned else "used_dltensor")
    del cap
    gc.collect()
    assert fake.destructor_calls == 1 and fake.deleter_calls == 1  # the producer did nothing
    np.testing.assert_array_equal(acc.state()[0][0], [data[0], data[1] + data[2]])

    # groups / index / mask capsules are released exactly once too
    fakes = [
        fk.FakeTensor(np.array([0, 1], np.int64), versioned=versioned),
        fk.FakeTensor(np.array([1, 0], np.int32), versioned=versioned),
    ]
    acts = np.ascontiguousarray(dyadic((2, 3, 4), rng))
    acc.add(0, acts, fakes[0].take_capsule(), index=fakes[1].take_capsule())
    assert [f.deleter_calls for f in fakes] == [1, 1]
    mask_fake = fk.FakeTensor(np.ones((2, 3), np.bool_), versioned=versioned)
    acc.set_batch(np.array([0, 0]), mask=mask_fake.take_capsule())
    assert mask_fake.deleter_calls == 1
    assert _core.dlpack_info(fk.FakeTensor(data, versioned=versioned).take_capsule())["versioned"] is versioned


def test_deleter_once_with_real_producers():
    """numpy's deleter drops its reference to the array: refcounts come back exactly."""
    x = np.ones((4, 3))
    g = np.array([0, 1, 0, 1])
    before = sys.getrefcount(x), sys.getrefcount(g)
    acc = _core.Accumulator(1, 3)
    for _ in range(50):
        acc.add(0, x, g)
        cap = x.__dlpack__()
        acc.add(0, cap, g)
        del cap
    assert (sys.getrefcount(x), sys.getrefcount(g)) == before


REJECTIONS = {
    # name: (FakeTensor kwargs, error type the C code raises, message fragment)
    "dtype_complex": (dict(dtype=(fk.COMPLEX, 64, 1)), TypeError, "complex64"),
    "dtype_lanes2": (dict(dtype=(fk.FLOAT, 32, 2)), TypeError, "2 lanes"),
    "dtype_float8": (dict(dtype=(fk.FLOAT8_E4M3FN, 8, 1)), TypeError, "float8 .DLPack code 10"),
    "dtype_float_8bits": (dict(dtype=(fk.FLOAT, 8, 1)), TypeError, "float8,"),
    "dtype_int_activations": (dict(dtype=(fk.INT, 32, 1)), TypeError, "int32"),
    "device_cuda": (dict(device=(fk.CUDA, 0)), ValueError, "cuda"),
    "device_rocm": (dict(device=(fk.CUDA + 8, 0)), ValueError, "rocm"),
    "ndim_9": (dict(shape=(1,) * 7 + (2, 3), strides=(0,) * 7 + (3, 1)), ValueError, "at most 8"),
    "ndim_3_without_index": (dict(shape=(2, 1, 3), strides=(3, 3, 1)), ValueError, "dimensions"),
    "ndim_1": (dict(shape=(6,), strides=(1,)), ValueError, "dimensions"),
    "misaligned_data": (dict(data=2), BufferError, "aligned"),
    "misaligned_offset": (dict(byte_offset=2), BufferError, "aligned"),
    "null_data": (dict(data="null"), BufferError, "NULL data"),
    "null_shape": (dict(null_shape=True), BufferError, "NULL shape"),
    "negative_shape": (dict(shape=(2, -3), strides=(3, 1)), BufferError, "negative"),
    "hidden_mismatch": (dict(shape=(2, 2), strides=(3, 1)), ValueError, "hidden size 2"),
    "batch_mismatch": (dict(shape=(1, 3), strides=(3, 1)), ValueError, "1 rows but the batch"),
}


def _rejection_fake(name, **extra):
    kwargs, _, _ = REJECTIONS[name]
    return fk.FakeTensor(np.zeros((2, 3), np.float32), **kwargs, **extra)


@pytest.mark.parametrize("name", sorted(REJECTIONS))
def test_rejections_error_type_and_message(name):
    """Error type and message for each rejected capsule (NULL deleter)."""
    _, error, fragment = REJECTIONS[name]
    fake = _rejection_fake(name, null_deleter=True)
    cap = fake.take_capsule()
    acc = _core.Accumulator(1, 3)
    with pytest.raises(error, match=fragment):
        acc.add(0, cap, np.array([0, 1]))
    # ownership was taken before the checks: the capsule is renamed, so nobody frees twice
    assert fk.capsule_name(cap).startswith("used_")
    assert acc.state()[1].sum() == 0


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("versioned", [True, False], ids=["versioned", "legacy"])
@pytest.mark.parametrize("name", ["dtype_complex", "dtype_lanes2", "device_cuda", "ndim_9",
                                  "ndim_3_without_index", "misaligned_data", "null_data"])
def test_deleter_once_after_rejection(name, versioned):
    fake = _rejection_fake(name, versioned=versioned)
    cap = fake.take_capsule()
    acc = _core.Accumulator(1, 3)
    with pytest.raises(Exception):
        acc.add(0, cap, np.array([0, 1]))
    assert fake.deleter_calls == 1
    assert fake.deleter_args == [fake.address]
    assert fk.capsule_name(cap) == ("used_dltensor_versioned" if versioned else "used_dltensor")
    del cap
    gc.collect()
    assert fake.deleter_calls == 1 and fake.destructor_calls == 1
    assert acc.state()[1].sum() == 0


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("name", ["dtype_complex", "device_cuda", "ndim_3_without_index"])
def test_rejection_error_survives_a_python_deleter(name):
    _, error, fragment = REJECTIONS[name]
    fake = _rejection_fake(name)
    cap = fake.take_capsule()
    with pytest.raises(error, match=fragment):
        _core.Accumulator(1, 3).add(0, cap, np.array([0, 1]))
    assert fake.deleter_calls == 1


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_deleter_once_when_groups_index_mask_rejected():
    acc = _core.Accumulator(1, 3)
    acts = np.zeros((2, 4, 3))
    cases = [
        ("groups", dict(groups=np.array([0.0, 1.0]))),  # float groups
        ("groups", dict(groups=np.array([[0, 1]]))),  # 2-D groups
        ("groups", dict(groups=np.array([0, 5]))),  # group out of range
        ("index", dict(index=np.array([0, 1, 2]))),  # wrong length
        ("mask", dict(mask=np.array([[1, 0, 0, 0], [0, 0, 0, 0]]))),  # empty row
        ("mask", dict(mask=np.ones(2, np.int8))),  # 1-D mask
    ]
    for what, kw in cases:
        fake = fk.FakeTensor(kw[what])
        kw = dict(kw, **{what: fake.take_capsule()})
        groups = kw.pop("groups", np.array([0, 1]))
        with pytest.raises(Exception):
            acc.add(0, acts, groups, **kw)
        assert fake.deleter_calls == 1, (what, kw)
    assert acc.state()[1].sum() == 0


def test_unknown_major_version_deleter_runs_when_dropped():
    fake = fk.FakeTensor(np.ones((2, 3), np.float32), version=(2, 0))
    cap = fake.take_capsule()
    acc = _core.Accumulator(1, 3)
    with pytest.raises(BufferError, match="major version 2"):
        acc.add(0, cap, np.array([0, 1]))
    assert fake.deleter_calls == 0
    assert fk.capsule_name(cap) == "dltensor_versioned"  # untouched: still the producer's
    with pytest.raises(BufferError, match="major version 2"):
        _core.dlpack_info(cap)
    assert fake.deleter_calls == 0
    del cap
    gc.collect()
    assert fake.destructor_calls == 1 and fake.deleter_calls == 1
    assert acc.state()[1].sum() == 0
    # a newer minor version of major 1 is fine
    fake = fk.FakeTensor(np.ones((2, 3), np.float32), version=(1, 7))
    acc.add(0, fake.take_capsule(), np.array([0, 1]))
    assert fake.deleter_calls == 1 and acc.state()[1].tolist() == [[1, 1]]


@pytest.mark.parametrize("name", [b"used_dltensor", b"used_dltensor_versioned", b"other"])
def test_capsule_with_another_name_is_refused(name):
    fake = fk.FakeTensor(np.ones((2, 3), np.float32), versioned=False, name=name)
    cap = fake.take_capsule()
    with pytest.raises(BufferError, match="dltensor"):
        _core.Accumulator(1, 3).add(0, cap, np.array([0, 1]))
    assert fk.capsule_name(cap) == name.decode()
    del cap
    gc.collect()
    assert fake.destructor_calls == 1 and fake.deleter_calls == 0


@pytest.mark.parametrize("versioned", [True, False], ids=["versioned", "legacy"])
def test_null_deleter_is_fine(versioned, rng):
    data = dyadic((2, 3), rng)
    fake = fk.FakeTensor(data, versioned=versioned, null_deleter=True)
    cap = fake.take_capsule()
    acc = _core.Accumulator(1, 3)
    acc.add(0, cap, np.array([1, 1]))
    assert fk.capsule_name(cap).startswith("used_")
    np.testing.assert_array_equal(acc.state()[0][0, 1], data.sum(0).astype(np.float64))
    del cap
    gc.collect()
    assert fake.deleter_calls == 0 and fake.destructor_calls == 1


# ========================================================================== 5. errors


def test_wrong_dtype_for_activations():
    acc = _core.Accumulator(1, 3)
    for x, name in [(np.ones((2, 3), np.int64), "int64"), (torch.ones(2, 3, dtype=torch.int32), "int32"),
                    (np.ones((2, 3), bool), "bool"), (torch.ones(2, 3, dtype=torch.uint8), "uint8")]:
        with pytest.raises(TypeError, match=name):
            acc.add(0, x, np.array([0, 1]))
    with pytest.raises(TypeError, match="complex128"):
        acc.add(0, np.ones((2, 3), np.complex128), np.array([0, 1]))
    with pytest.raises(TypeError, match="float8 .DLPack code 10"):
        acc.add(0, torch.zeros(2, 3, dtype=torch.float8_e4m3fn), np.array([0, 1]))
    with pytest.raises(TypeError, match="uint16, which is not supported"):
        acc.add(0, np.ones((2, 3), np.uint16), np.array([0, 1]))
    # float groups / index / mask
    with pytest.raises(TypeError, match="groups must hold integers"):
        acc.add(0, np.ones((2, 3)), np.array([0.0, 1.0]))
    with pytest.raises(TypeError, match="index must hold integers"):
        acc.add(0, np.ones((2, 4, 3)), np.array([0, 1]), index=torch.tensor([0.0, 1.0]))
    with pytest.raises(TypeError, match="mask must hold integers"):
        acc.add(0, np.ones((2, 4, 3)), np.array([0, 1]), mask=np.ones((2, 4), np.float16))
    assert acc.state()[1].sum() == 0


def test_shape_errors():
    acc = _core.Accumulator(2, 3)
    g = np.array([0, 1])
    with pytest.raises(ValueError, match="dimensions"):
        acc.add(0, np.ones((2, 4, 3)), g)  # 3-D without index or mask
    with pytest.raises(ValueError, match="dimensions"):
        acc.add(0, np.ones((2, 3)), g, index=np.array([0, 0]))  # 2-D with index
    with pytest.raises(ValueError, match="dimensions"):
        acc.add(0, np.ones(3), np.array([0]))
    with pytest.raises(ValueError, match="groups must be 1-dimensional"):
        acc.add(0, np.ones((2, 3)), np.array([[0, 1]]))
    with pytest.raises(ValueError, match="mask must be 2-dimensional"):
        acc.add(0, np.ones((2, 4, 3)), g, mask=np.ones((2, 4, 1), np.int8))
    with pytest.raises(ValueError, match="index must be 1-dimensional"):
        acc.add(0, np.ones((2, 4, 3)), g, index=np.zeros((2, 1), np.int64))
    with pytest.raises(ValueError, match="hidden size 4"):
        acc.add(0, np.ones((2, 4)), g)
    with pytest.raises(ValueError, match="hidden size 5"):
        acc.add(0, np.ones((2, 4, 5)), g, index=np.array([0, 0]))
    with pytest.raises(ValueError, match="3 rows but the batch has 2"):
        acc.add(0, np.ones((3, 3)), g)
    with pytest.raises(ValueError, match="index has 3 entries"):
        acc.add(0, np.ones((2, 4, 3)), g, index=np.array([0, 0, 0]))
    with pytest.raises(ValueError, match="mask has 1 rows"):
        acc.add(0, np.ones((2, 4, 3)), g, mask=np.ones((1, 4), np.int8))
    with pytest.raises(ValueError, match="sequence length 4 but the mask has 5"):
        acc.add(0, np.ones((2, 4, 3)), g, mask=np.ones((2, 5), np.int8))
    acc.set_batch(g, index=np.array([0, 1]))
    with pytest.raises(ValueError, match="rows"):
        acc.add_batch(0, np.ones((3, 4, 3)))
    with pytest.raises(ValueError, match="dimensions"):
        acc.add_batch(0, np.ones((2, 3)))
    assert acc.state()[1].sum() == 0


def test_range_errors():
    acc = _core.Accumulator(2, 3, num_groups=2)
    x3 = np.ones((2, 4, 3))
    g = np.array([0, 1])
    with pytest.raises(IndexError, match=r"index\[1\] is 4"):
        acc.add(0, x3, g, index=np.array([3, 4]))
    with pytest.raises(IndexError, match=r"index\[0\] is -1"):
        acc.add(0, x3, g, index=np.array([-1, 0]))
    with pytest.raises(IndexError, match="index"):
        acc.add(0, x3, g, index=np.array([0, 2**62]))
    with pytest.raises(ValueError, match="mask row 1 selects no token"):
        acc.add(0, x3, g, mask=np.array([[1, 0, 0, 0], [0, 0, 0, 0]]))
    with pytest.raises(ValueError, match=r"groups\[1\] is 2"):
        acc.add(0, np.ones((2, 3)), np.array([0, 2]))
    with pytest.raises(ValueError, match=r"groups\[0\] is -2"):
        acc.add(0, np.ones((2, 3)), np.array([-2, 0]))
    with pytest.raises(ValueError, match=r"groups\[0\] is 255"):
        acc.add(0, np.ones((2, 3)), np.array([255, 0], np.uint8))
    for slot in (2, -1, 10**6):
        with pytest.raises(IndexError, match="slot"):
            acc.add(slot, np.ones((2, 3)), g)
    acc.set_batch(g)
    with pytest.raises(IndexError, match="slot 5"):
        acc.add_batch(5, np.ones((2, 3)))
    with pytest.raises(IndexError, match="slot"):
        _core.CaptureHook(acc, 9)(None, (), np.ones((2, 3)))
    with pytest.raises(ValueError, match="not both"):
        acc.add(0, x3, g, index=np.array([0, 0]), mask=np.ones((2, 4)))
    with pytest.raises(ValueError, match="not both"):
        acc.set_batch(g, index=np.array([0, 0]), mask=np.ones((2, 4)))
    assert acc.state()[1].sum() == 0


@pytest.mark.parametrize("what", ["activations", "groups", "index", "mask"])
def test_non_dlpack_object_names_the_argument(what):
    acc = _core.Accumulator(1, 3)
    args = {"activations": np.ones((2, 4, 3)), "groups": np.array([0, 1]),
            "index": np.array([0, 1])}
    if what == "mask":
        del args["index"]
        args["mask"] = [[1, 1, 1, 1], [1, 1, 1, 1]]
    else:
        args[what] = [[0.0]] if what == "activations" else [0, 1]
    with pytest.raises(TypeError, match=rf"^{what} must be a tensor or array that supports DLPack"):
        acc.add(0, args.pop("activations"), args.pop("groups"), **args)
    with pytest.raises(TypeError, match="tensor must be"):
        _core.dlpack_info(object())


def test_dlpack_info_fields():
    info = _core.dlpack_info(torch.zeros(2, 3, 4, dtype=torch.bfloat16)[:, 1])
    assert info == {"dtype": "bfloat16", "shape": (2, 4), "strides": (12, 1), "device_type": 1,
                    "versioned": True}
    info = _core.dlpack_info(np.array(3.5, np.float32))
    assert info["shape"] == () and info["strides"] == ()


def test_fake_capsule_data_offset_and_strides(rng):
    base = dyadic((4, 3), rng)
    acc = _core.Accumulator(1, 3)
    # byte_offset: data + byte_offset is the first element
    fake = fk.FakeTensor(base, shape=(2, 3), strides=(3, 1), byte_offset=2 * 3 * 4)
    acc.add(0, fake.take_capsule(), np.array([0, 1]))
    np.testing.assert_array_equal(acc.state()[0][0], base[2:4].astype(np.float64))
    # NULL strides mean row-major: a [2, 2, 3] view of 12 floats, index picks rows
    acc.reset()
    fake = fk.FakeTensor(base, shape=(2, 2, 3), null_strides=True)
    assert _core.dlpack_info(fk.FakeTensor(base, shape=(2, 2, 3), null_strides=True)
                             .take_capsule())["strides"] == (6, 3, 1)
    acc.add(0, fake.take_capsule(), np.array([0, 1]), index=np.array([1, 0]))
    np.testing.assert_array_equal(acc.state()[0][0], base[[1, 2]].astype(np.float64))
    # strides of size-1 dims are never used, whatever they are
    acc.reset()
    fake = fk.FakeTensor(base, shape=(1, 1, 3), strides=(123456, -98765, 1))
    acc.add(0, fake.take_capsule(), np.array([1]), index=np.array([0]))
    np.testing.assert_array_equal(acc.state()[0][0, 1], base[0].astype(np.float64))
    # negative and zero strides in a hand-made tensor
    acc.reset()
    fake = fk.FakeTensor(base, shape=(3, 3), strides=(0, -1), byte_offset=2 * 4)
    acc.add(0, fake.take_capsule(), np.array([0, 0, 1]))
    np.testing.assert_array_equal(acc.state()[0][0], [base[0, ::-1] * 2, base[0, ::-1]])


def test_null_data_with_size_zero_works():
    empty = np.zeros((0, 3), np.float32)
    for shape in [(0, 3), (0, 0, 3)]:
        info = _core.dlpack_info(fk.FakeTensor(empty, shape=shape, null_strides=True,
                                               data="null").take_capsule())
        assert info["shape"] == shape
    acc = _core.Accumulator(1, 3)
    fake = fk.FakeTensor(empty, data="null")
    acc.add(0, fake.take_capsule(), np.zeros(0, np.int64))
    assert fake.deleter_calls == 1
    fake = fk.FakeTensor(empty, shape=(2, 0, 3), strides=(0, 3, 1), data="null")
    acc.add(0, fake.take_capsule(), np.array([-1, -1]), mask=np.zeros((2, 0), bool))
    groups = fk.FakeTensor(np.zeros(0, np.int64), data="null")
    acc.add(0, np.zeros((0, 3)), groups.take_capsule())
    np.testing.assert_array_equal(acc.state()[1], 0)


def test_size_zero_with_huge_dims_and_null_strides():
    # NULL strides mean row-major; for (0, 2**62, 2**62) the stride of dim 0 is 2**124.
    # Computing it was a signed overflow (UBSan); it is refused as unrepresentable.
    # (The capsules are held in a variable: the fakes' ctypes destructor cannot run while
    # the error is pending, as it would if the call's temporary argument died first.)
    empty = np.zeros(0, np.float32)
    for shape in [(0, 2**62, 2**62), (0, 4, 2**62), (2**40, 0, 2**40, 2**40)]:
        fake = fk.FakeTensor(empty, shape=shape, null_strides=True, data="null")
        cap = fake.take_capsule()
        with pytest.raises(BufferError, match="overflow int64"):
            _core.dlpack_info(cap)
        assert fake.deleter_calls == 1
    acc = _core.Accumulator(1, 4)
    fake = fk.FakeTensor(empty, shape=(0, 2**62, 2**62), null_strides=True, data="null")
    cap = fake.take_capsule()
    with pytest.raises(BufferError, match="overflow int64"):
        acc.add(0, cap, np.zeros(0, np.int64), index=np.zeros(0, np.int64))
    assert fake.deleter_calls == 1
    # strides that fit are still filled in; the outermost one never needs the full product
    info = _core.dlpack_info(fk.FakeTensor(empty, shape=(2**62, 0, 2**62), null_strides=True,
                                           data="null").take_capsule())
    assert info["strides"] == (2**62, 2**62, 1)
    # explicit strides of a size-0 tensor are taken as given, whatever the dims
    info = _core.dlpack_info(fk.FakeTensor(empty, shape=(0, 2**62, 2**62), strides=(0, 0, 1),
                                           data="null").take_capsule())
    assert info["shape"] == (0, 2**62, 2**62) and info["strides"] == (0, 0, 1)


def test_errors_leave_the_accumulator_usable():
    acc = _core.Accumulator(1, 3)
    for bad in (lambda: acc.add(0, np.ones((2, 4)), np.array([0, 1])),
                lambda: acc.add(0, [1], np.array([0])),
                lambda: acc.add(0, np.ones((2, 3)), [0, 1]),
                lambda: acc.add(3, np.ones((2, 3)), np.array([0, 1]))):
        with pytest.raises(Exception):
            bad()
        acc.add(0, np.ones((2, 3)), np.array([0, 1]))
    np.testing.assert_array_equal(acc.state()[1], [[4, 4]])


def test_reentrant_use_from_dlpack_is_refused():
    acc = _core.Accumulator(1, 3)

    class Reentrant:
        def __dlpack__(self, **kwargs):
            acc.reset()  # runs while acc.add() holds the accumulator
            return np.ones((1, 3)).__dlpack__(**kwargs)

    acc.add(0, np.ones((1, 3)), np.array([0]))
    with pytest.raises(RuntimeError, match="already in use"):
        acc.add(0, Reentrant(), np.array([0]))
    np.testing.assert_array_equal(acc.state()[1], [[1, 0]])
    acc.add(0, np.ones((1, 3)), np.array([1]))
    np.testing.assert_array_equal(acc.state()[1], [[1, 1]])


# ========================================================================= 6. threads


def test_two_threads_two_accumulators_match_serial(rng):
    batches = [
        [(torch.from_numpy(rng.standard_normal((32, 16, 64)).astype(np.float32)),
          torch.from_numpy(rng.integers(-1, 2, size=32)),
          torch.from_numpy(rng.integers(0, 16, size=32))) for _ in range(20)]
        for _ in range(2)
    ]

    def run(acc, work, repeats):
        for _ in range(repeats):
            for i, (x, g, idx) in enumerate(work):
                acc.add(i % 2, x, g, index=idx)
                acc.add(2, x[:, 0], g)

    serial = [_core.Accumulator(3, 64) for _ in range(2)]
    for acc, work in zip(serial, batches):
        run(acc, work, 5)
    parallel = [_core.Accumulator(3, 64) for _ in range(2)]
    errors = []

    def target(acc, work):
        try:
            run(acc, work, 5)
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=target, args=(a, w)) for a, w in zip(parallel, batches)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    for p, s in zip(parallel, serial):
        assert_state(p, *s.state())


def test_one_accumulator_two_threads_is_serial_or_refused():
    acc = _core.Accumulator(1, 4096)
    rows = 64
    values = {0: np.full((rows, 4096), 1.0, np.float32), 1: np.full((rows, 4096), 2.0, np.float32)}
    groups = np.zeros(rows, np.int64)
    ok = {0: 0, 1: 0}
    refused = {0: 0, 1: 0}
    errors = []
    barrier = threading.Barrier(2)

    def target(who):
        try:
            barrier.wait()
            for i in range(60):
                try:
                    if i % 3 == 2:
                        acc.set_batch(groups)
                        acc.add_batch(0, values[who])
                    else:
                        acc.add(0, values[who], groups)
                    ok[who] += 1
                except RuntimeError as e:
                    assert "already in use" in str(e)
                    refused[who] += 1
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=target, args=(w,)) for w in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert ok[0] + ok[1] + refused[0] + refused[1] == 120  # every call accounted for
    assert ok[0] + ok[1] >= 1  # the first call of either thread cannot be refused
    sums, counts = acc.state()
    # a refused call added nothing; every other one added all rows, whole
    assert counts.tolist() == [[rows * (ok[0] + ok[1]), 0]]
    np.testing.assert_array_equal(sums[0, 0], rows * (ok[0] * 1.0 + ok[1] * 2.0))
    np.testing.assert_array_equal(sums[0, 1], 0.0)


# ================================================================= 7. refcounts, leaks


def _traced_growth(fn, calls, warmup=500):
    for _ in range(warmup):
        fn()
    gc.collect()
    tracemalloc.start()
    try:
        gc.collect()
        start = tracemalloc.get_traced_memory()[0]
        for _ in range(calls):
            fn()
        gc.collect()
        end = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    return end - start


def test_no_leak_over_20000_adds_with_torch_inputs():
    acc = _core.Accumulator(2, 8)
    acts3 = torch.randn(4, 5, 8)
    acts2 = torch.randn(4, 8, dtype=torch.float16)
    groups = torch.tensor([0, 1, 0, -1])
    index = torch.tensor([4, 0, 2, 1])
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [0, 0, 1, 0, 0], [0, 0, 0, 0, 0]],
                        dtype=torch.bool)
    tensors = (acts3, acts2, groups, index, mask)
    before = [sys.getrefcount(t) for t in tensors]
    step = [0]

    def one():
        k = step[0] % 3
        step[0] += 1
        if k == 0:
            acc.add(0, acts2, groups)
        elif k == 1:
            acc.add(1, acts3, groups, index=index)
        else:
            acc.add(1, acts3, groups, mask=mask)

    growth = _traced_growth(one, 20000)
    # a leaked plan (>= 3 small PyMem_Raw blocks) or capsule per call would be >= 300 kB
    assert growth < 16 * 1024, growth
    assert [sys.getrefcount(t) for t in tensors] == before
    assert acc.state()[1].sum() == 3 * 20500  # every call added three rows


def test_no_leak_on_set_batch_add_batch_hook_and_errors():
    acc = _core.Accumulator(1, 8)
    acts = torch.randn(4, 5, 8)
    np_acts = np.ones((4, 5, 8), np.float32)
    groups = torch.tensor([0, 1, 0, 1])
    index = np.array([4, 0, 2, 1])
    hook = _core.CaptureHook(acc, 0)
    before = [sys.getrefcount(o) for o in (acts, np_acts, groups, index)]

    def one():
        acc.set_batch(groups, index=index)
        acc.add_batch(0, acts)
        hook(None, (), (np_acts,))
        try:
            acc.add(0, np_acts, groups, index=np.array([9, 9, 9, 9]))
        except IndexError:
            pass
        try:
            acc.add(0, np_acts[..., :4], groups, index=index)
        except ValueError:
            pass
        try:
            acc.add(0, acts.to(torch.int32), groups, index=index)
        except TypeError:
            pass

    growth = _traced_growth(one, 3000, warmup=200)
    assert growth < 16 * 1024, growth
    assert [sys.getrefcount(o) for o in (acts, np_acts, groups, index)] == before
    assert hook.calls == 3200
