"""The C type behind the moment methods: _core.PairMoments."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from rotalabs_steer import _core


def truth(rows: np.ndarray, pos, neg):
    d = rows[pos].astype(np.float64) - rows[neg].astype(np.float64)
    return len(pos), d.sum(0), d.T @ d


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_add_matches_numpy(dtype):
    rows = torch.randn(9, 7, dtype=dtype, generator=torch.Generator().manual_seed(0))
    pos, neg = [0, 2, 4, 8], [1, 3, 5, 6]
    moments = _core.PairMoments(2, 7)
    moments.add(1, rows, torch.tensor(pos), torch.tensor(neg))
    moments.add(1, rows, np.array([7]), np.array([0]))  # any DLPack producer for the indices
    counts, sums, second = moments.state()
    n, s, m = truth(rows.numpy(), pos + [7], neg + [0])
    assert counts.tolist() == [0, n] and sums.dtype == second.dtype == np.float64
    np.testing.assert_allclose(sums[1], s, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(second[1], m, rtol=1e-12, atol=1e-14)
    assert np.array_equal(second[1], second[1].T) and not second[0].any()


def test_strided_rows_and_empty_batches():
    base = torch.randn(6, 10, dtype=torch.float64)
    rows = base[:, ::2]  # non-contiguous columns
    moments = _core.PairMoments(1, 5)
    moments.add(0, rows, torch.tensor([0, 2]), torch.tensor([1, 3]))
    moments.add(0, rows, torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long))
    _, sums, second = moments.state()
    _, s, m = truth(rows.numpy(), [0, 2], [1, 3])
    np.testing.assert_allclose(second[0], m, rtol=1e-12)
    np.testing.assert_allclose(sums[0], s, rtol=1e-12)


def test_merge_and_state_round_trip():
    rows = torch.randn(4, 3, dtype=torch.float64)
    a, b = _core.PairMoments(1, 3), _core.PairMoments(1, 3)
    a.add(0, rows, torch.tensor([0]), torch.tensor([1]))
    b.add(0, rows, torch.tensor([2]), torch.tensor([3]))
    a.merge(b)
    whole = _core.PairMoments(1, 3)
    whole.add(0, rows, torch.tensor([0, 2]), torch.tensor([1, 3]))
    for got, want in zip(a.state(), whole.state()):
        np.testing.assert_allclose(got, want, rtol=1e-14)
    c = _core.PairMoments(1, 3)
    c.load_state(*a.state())
    assert all(np.array_equal(x, y) for x, y in zip(c.state(), a.state()))
    c.reset()
    assert not any(array.any() for array in c.state())


def test_bad_inputs_are_clear_errors():
    moments = _core.PairMoments(2, 4)
    rows = torch.zeros(3, 4)
    index = torch.tensor([0])
    with pytest.raises(ValueError, match="num_slots and hidden"):
        _core.PairMoments(0, 4)
    with pytest.raises(IndexError, match="slot 2"):
        moments.add(2, rows, index, index)
    with pytest.raises(TypeError, match="float32 or float64, not float16"):
        moments.add(0, rows.half(), index, index)
    with pytest.raises(ValueError, match=r"shape \(n, 4\)"):
        moments.add(0, torch.zeros(3, 5), index, index)
    with pytest.raises(IndexError, match="neg_index.*out of range"):
        moments.add(0, rows, index, torch.tensor([3]))
    with pytest.raises(TypeError, match="pos_index must hold integers"):
        moments.add(0, rows, torch.tensor([0.0]), index)
    with pytest.raises(ValueError, match="same length"):
        moments.add(0, rows, torch.tensor([0, 1]), index)
    with pytest.raises(TypeError, match="PairMoments"):
        moments.merge(_core.Accumulator(2, 4))
    with pytest.raises(ValueError, match="itself"):
        moments.merge(moments)
    with pytest.raises(ValueError, match="expected 2 slots"):
        moments.merge(_core.PairMoments(1, 4))
    counts, sums, second = moments.state()
    with pytest.raises(ValueError, match="counts\\[0\\] is negative"):
        moments.load_state(counts - 1, sums, second)
    with pytest.raises(TypeError, match="float64"):
        moments.load_state(counts, sums.astype(np.float32), second)
    with pytest.raises(ValueError, match="moments must have shape"):
        moments.load_state(counts, sums, second[:, :3])
    assert not any(array.any() for array in moments.state())  # nothing was half-applied


def test_threads_sharing_one_object_get_a_clear_error_or_correct_sums():
    moments = _core.PairMoments(1, 256)
    rows = torch.randn(64, 256, dtype=torch.float64)
    pos, neg = torch.arange(0, 64, 2), torch.arange(1, 64, 2)
    errors = []

    def work():
        for _ in range(20):
            try:
                moments.add(0, rows, pos, neg)
            except RuntimeError as error:
                errors.append(error)

    threads = [threading.Thread(target=work) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all("already in use" in str(e) for e in errors)
    counts, sums, _ = moments.state()
    assert counts[0] == 32 * (40 - len(errors))
