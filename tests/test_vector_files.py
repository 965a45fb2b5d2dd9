"""Vector files both ways: the reference's layout written beside ours, golden files, and
rotalabs-steer 1.2.0 itself loading what we write (and we loading what it writes)."""

from __future__ import annotations

import json
import shutil
import textwrap
from pathlib import Path

import pytest
import torch

from reference_venv import run_reference
from rotalabs_steer import SteeringVector, SteeringVectorSet

GOLDEN = Path(__file__).resolve().parent / "golden"
REFERENCE_KEYS = {"behavior", "layer_index", "model_name", "extraction_method", "metadata", "vector_shape"}


def vector(layer=2, seed=0, behavior="refusal", dim=16) -> SteeringVector:
    generator = torch.Generator().manual_seed(seed)
    return SteeringVector(behavior, layer, torch.randn(dim, generator=generator), "tiny",
                          metadata={"num_pairs": 3, "token_position": "last"})


def test_save_writes_the_reference_layout_too(tmp_path):
    v = vector()
    v.save(tmp_path / "vec")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vec.json", "vec.pt", "vec.safetensors"]
    plain = torch.load(tmp_path / "vec.pt", weights_only=True)  # what the reference's load() does
    assert type(plain) is torch.Tensor and torch.equal(plain, v.vector)
    sidecar = json.loads((tmp_path / "vec.json").read_text())
    assert REFERENCE_KEYS <= set(sidecar) and sidecar["metadata"] == v.metadata
    assert sidecar["vector_shape"] == [16] and not list(tmp_path.glob(".*"))  # no temporary left


def test_pt_file_holds_only_the_vector(tmp_path):
    """A view's torch.save would store its whole base storage; the file must hold 16 floats."""
    base = torch.randn(1000)
    SteeringVector("r", 0, base[10:26], "m").save(tmp_path / "v")
    loaded = torch.load(tmp_path / "v.pt", weights_only=True)
    assert loaded.untyped_storage().nbytes() == 16 * 4 and torch.equal(loaded, base[10:26])


def test_resave_leaves_no_stale_tensor(tmp_path):
    first, second = vector(seed=1), vector(seed=2)
    first.save(tmp_path / "v")
    second.save(tmp_path / "v.json")  # any of the suffixes names the same files
    assert torch.equal(SteeringVector.load(tmp_path / "v").vector, second.vector)
    assert torch.equal(torch.load(tmp_path / "v.pt", weights_only=True), second.vector)


def test_reference_resave_over_ours_wins(tmp_path):
    """The reference re-saving over our files rewrites .json + .pt only: the .pt is the truth."""
    vector(seed=1).save(tmp_path / "v")
    newer = vector(seed=2)
    sidecar = {k: v for k, v in json.loads((tmp_path / "v.json").read_text()).items() if k in REFERENCE_KEYS}
    (tmp_path / "v.json").write_text(json.dumps(sidecar))
    torch.save(newer.vector, tmp_path / "v.pt")
    assert torch.equal(SteeringVector.load(tmp_path / "v").vector, newer.vector)


def test_set_resave_removes_dropped_layers(tmp_path):
    SteeringVectorSet("refusal", [vector(1), vector(2), vector(3)]).save(tmp_path)
    SteeringVectorSet("refusal", [vector(2, seed=5)]).save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "layer_2.json", "layer_2.pt", "layer_2.safetensors", "metadata.json"]
    assert SteeringVectorSet.load(tmp_path).layers == [2]


def test_two_dimensional_reference_file_loads_squeezed(tmp_path):
    shutil.copy(GOLDEN / "reference_2d.json", tmp_path / "v.json")
    shutil.copy(GOLDEN / "reference_2d.pt", tmp_path / "v.pt")
    with pytest.warns(UserWarning, match=r"shape \[1, 8\]"):
        loaded = SteeringVector.load(tmp_path / "v")
    assert loaded.vector.shape == (8,) and loaded.dim == 8
    loaded.save(tmp_path / "v")  # written back 1-D, in both layouts
    assert json.loads((tmp_path / "v.json").read_text())["vector_shape"] == [8]
    assert torch.load(tmp_path / "v.pt", weights_only=True).shape == (8,)


def test_larger_two_dimensional_tensor_is_refused(tmp_path):
    shutil.copy(GOLDEN / "reference_2d.json", tmp_path / "v.json")
    torch.save(torch.zeros(2, 8), tmp_path / "v.pt")
    with pytest.raises(ValueError, match=r"1-D floating-point tensor \(or one \[1, hidden\] row\), got float32 of shape \[2, 8\]"):
        SteeringVector.load(tmp_path / "v")


# --- golden files (tests/golden/make_golden.py wrote them) -----------------------------------

def test_golden_ours_resaves_byte_identical(tmp_path):
    loaded = SteeringVector.load(GOLDEN / "ours")
    assert loaded.vector.tolist() == [0.5, -1.25, 2.0, 0.0, 3.5, -0.75, 1.0, -2.5]
    assert loaded.metadata == {"created_at": "2025-01-02T03:04:05", "num_pairs": 4, "vector_norm": 5.5}
    loaded.save(tmp_path / "ours")
    for suffix in (".json", ".safetensors"):
        assert (tmp_path / f"ours{suffix}").read_bytes() == (GOLDEN / f"ours{suffix}").read_bytes(), suffix
    # torch.save zips carry a random serialization id: compare the tensor
    assert torch.equal(torch.load(tmp_path / "ours.pt", weights_only=True),
                       torch.load(GOLDEN / "ours.pt", weights_only=True))


def test_golden_reference_layout_loads_and_resaves(tmp_path):
    loaded = SteeringVector.load(GOLDEN / "reference_layout.pt")
    assert loaded.vector.dtype == torch.float16
    assert loaded.vector.tolist() == [0.5, -1.25, 2.0, 0.0, 3.5, -0.75, 1.0, -2.5]
    golden = json.loads((GOLDEN / "reference_layout.json").read_text())
    assert (loaded.behavior, loaded.layer_index, loaded.model_name, loaded.metadata) == (
        golden["behavior"], golden["layer_index"], golden["model_name"], golden["metadata"])
    loaded.save(tmp_path / "again")
    resaved = json.loads((tmp_path / "again.json").read_text())
    assert {k: resaved[k] for k in REFERENCE_KEYS} == golden  # field-level: the reference's keys intact
    assert resaved["vector_dtype"] == "float16"
    assert torch.equal(torch.load(tmp_path / "again.pt", weights_only=True),
                       torch.load(GOLDEN / "reference_layout.pt", weights_only=True))


# --- rotalabs-steer 1.2.0 itself ---------------------------------------------------------------

@pytest.mark.slow
def test_reference_loads_our_vector_and_set(tmp_path):
    single = vector(seed=3)
    single.save(tmp_path / "single")
    vector_set = SteeringVectorSet("refusal", [vector(0, seed=4), vector(5, seed=6)])
    vector_set.save(tmp_path / "set")
    got = run_reference(textwrap.dedent(f"""
        import json
        from rotalabs_steer import SteeringVector, SteeringVectorSet
        def describe(v):
            return {{"behavior": v.behavior, "layer_index": v.layer_index, "model_name": v.model_name,
                    "extraction_method": v.extraction_method, "metadata": v.metadata,
                    "vector": v.vector.tolist(), "dtype": str(v.vector.dtype)}}
        single = SteeringVector.load({str(tmp_path / "single")!r})
        vs = SteeringVectorSet.load({str(tmp_path / "set")!r})
        print(json.dumps({{"single": describe(single), "set_behavior": vs.behavior, "layers": vs.layers,
                          "set": [describe(vs[i]) for i in vs.layers], "model_name": vs.model_name}}))
    """))
    for want, have in [(single, got["single"])] + list(zip(vector_set, got["set"])):
        assert have["vector"] == want.vector.tolist() and have["dtype"] == "torch.float32"
        assert (have["behavior"], have["layer_index"], have["model_name"], have["extraction_method"],
                have["metadata"]) == (want.behavior, want.layer_index, want.model_name,
                                      want.extraction_method, want.metadata)
    assert (got["set_behavior"], got["layers"], got["model_name"]) == ("refusal", [0, 5], "tiny")


@pytest.mark.slow
def test_we_load_the_references_files(tmp_path):
    run_reference(textwrap.dedent(f"""
        import json, torch
        from rotalabs_steer import SteeringVector, SteeringVectorSet
        g = torch.Generator().manual_seed(7)
        vs = SteeringVectorSet("humor", [SteeringVector("humor", i, torch.randn(12, generator=g), "ref-model",
                                                        metadata={{"num_pairs": 9, "created_at": "x"}})
                                         for i in (1, 4)])
        vs.save({str(tmp_path / "set")!r})
        vs[4].save({str(tmp_path / "single")!r})
        print(json.dumps(None))
    """))
    loaded = SteeringVectorSet.load(tmp_path / "set")
    assert loaded.behavior == "humor" and loaded.layers == [1, 4] and loaded.model_name == "ref-model"
    generator = torch.Generator().manual_seed(7)
    for layer in (1, 4):
        assert torch.equal(loaded[layer].vector, torch.randn(12, generator=generator))
        assert loaded[layer].metadata == {"num_pairs": 9, "created_at": "x"}
    single = SteeringVector.load(tmp_path / "single.json")
    assert torch.equal(single.vector, loaded[4].vector) and single.layer_index == 4
