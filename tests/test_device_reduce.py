"""The device reduction path (reduce_on="device") equals the C path, and never syncs per batch.

On the CPU, reduce_on="device" runs the torch path on host tensors: the same code a GPU runs.
Syncs are counted as calls, from this package's code, of the tensor methods that copy a
device tensor to the host (item, tolist, cpu, numpy, __bool__, ...): their number must not
grow with the number of batches. On CUDA, torch's own sync debug mode raises on any sync.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from rotalabs_steer.extraction import extract_caa_vectors
from tiny_models import make_model, make_tokenizer, refusal_pairs

LAYERS = [0, 2, 3]
SEPARATION = ("separation_accuracy", "separation_cohens_d", "separation_sample_size")


@pytest.fixture(scope="module")
def llama():
    return make_model("llama"), make_tokenizer()


@pytest.mark.parametrize("token_position", ["last", "first", "mean"])
@pytest.mark.parametrize("component", ["residual", "mlp"])
def test_device_path_equals_the_c_path(llama, token_position, component):
    model, tokenizer = llama
    pairs = refusal_pairs(8)
    # the plain path on both sides: this compares the two reductions, not prefix sharing
    options = dict(show_progress=False, batch_size=3, component=component, share_prefix=False)
    host = extract_caa_vectors(model, tokenizer, pairs, LAYERS, token_position, reduce_on="host", **options)
    device = extract_caa_vectors(model, tokenizer, pairs, LAYERS, token_position, reduce_on="device", **options)
    for layer in LAYERS:
        want, got = host[layer], device[layer]
        # relative to the activations' size: "first" reads the shared BOS token, a zero vector
        scale = max(want.norm, want.metadata["pos_mean_norm"])
        assert float((got.vector.double() - want.vector.double()).norm()) <= 1e-6 * scale
        assert got.metadata["pos_mean_norm"] == pytest.approx(want.metadata["pos_mean_norm"], rel=1e-6)
        assert got.metadata["num_positive"] == want.metadata["num_positive"] == len(pairs)
        # 16 rows < the 512-row sample: both paths keep every row, so the figures are the same
        for key in SEPARATION:
            if want.metadata[key] is None:  # undefined for a zero vector
                assert got.metadata[key] is None, key
            else:
                assert got.metadata[key] == pytest.approx(want.metadata[key], rel=1e-6), key
        assert np.allclose(np.sort(got.held_out_projections["positive"]),
                           np.sort(want.held_out_projections["positive"]), rtol=0, atol=1e-6 * scale)


def test_device_path_sample_is_bounded_and_uniform(llama):
    model, tokenizer = llama
    pairs = refusal_pairs(12)
    vectors = extract_caa_vectors(model, tokenizer, pairs, [2], "last", show_progress=False, batch_size=4,
                                  separation_sample=10, reduce_on="device")
    assert vectors[2].metadata["separation_sample_size"] == 10


_SYNCING = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__")


class SyncCounter:
    """Counts calls of host-syncing tensor methods made from rotalabs_steer's own code."""

    def __init__(self, monkeypatch):
        self.calls: list[str] = []
        for name in _SYNCING:
            original = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name, self._wrap(name, original))

    def _wrap(self, name, original):
        def counted(tensor, *args, **kwargs):
            caller = sys._getframe(1).f_globals.get("__name__", "")
            if caller.startswith("rotalabs_steer"):
                self.calls.append(f"{caller}:{name}")
            return original(tensor, *args, **kwargs)
        return counted


def test_host_syncs_do_not_grow_with_the_number_of_batches(llama, monkeypatch):
    model, tokenizer = llama
    counts = {}
    for batch_size in (8, 2):  # 2 batches, then 8
        counter = SyncCounter(monkeypatch)
        extract_caa_vectors(model, tokenizer, refusal_pairs(8), LAYERS, "mean", show_progress=False,
                            batch_size=batch_size, reduce_on="device")
        counts[batch_size] = counter.calls
        monkeypatch.undo()
    assert len(counts[2]) == len(counts[8]), (counts[2], counts[8])


@pytest.mark.gpu
@pytest.mark.parametrize("token_position", ["last", "mean"])
def test_cuda_extraction_never_syncs_between_batches(llama, token_position):
    model, tokenizer = llama
    cuda_model = make_model("llama").cuda()
    want = extract_caa_vectors(model, tokenizer, refusal_pairs(8), LAYERS, token_position, show_progress=False,
                               batch_size=2)
    torch.cuda.set_sync_debug_mode("error")
    try:
        from rotalabs_steer.extraction import forward

        real_merge = forward.DeviceReducer.merge_into

        def merge_allowing_sync(self, accumulator):  # the one transfer at the end
            torch.cuda.set_sync_debug_mode("default")
            return real_merge(self, accumulator)

        forward.DeviceReducer.merge_into = merge_allowing_sync
        got = extract_caa_vectors(cuda_model, tokenizer, refusal_pairs(8), LAYERS, token_position,
                                  show_progress=False, batch_size=2, separation_sample=0)
    finally:
        forward.DeviceReducer.merge_into = real_merge
        torch.cuda.set_sync_debug_mode("default")
    for layer in LAYERS:
        rel = (got[layer].vector.double() - want[layer].vector.double()).norm() / want[layer].vector.double().norm()
        assert float(rel) <= 1e-5
