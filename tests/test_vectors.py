"""SteeringVector / SteeringVectorSet: members, file round trips, the reference layout."""

from __future__ import annotations

import json

import pytest
import torch

from rotalabs_steer import SteeringVector, SteeringVectorSet


def make_vector(layer=3, behavior="refusal", seed=0, dim=16) -> SteeringVector:
    torch.manual_seed(seed)
    return SteeringVector(behavior, layer, torch.randn(dim), "tiny/model", "caa",
                          {"num_pairs": 7, "vector_norm": 1.2345678901234567, "token_position": "last"})


def test_members():
    v = make_vector()
    assert v.dim == 16 and v.norm == pytest.approx(float(v.vector.double().norm()))
    assert "created_at" in v.metadata
    unit = v.normalize()
    assert unit.norm == pytest.approx(1.0) and unit.metadata["normalized"] is True
    scaled = v.scale(-2.0)
    torch.testing.assert_close(scaled.vector, v.vector * -2.0)
    assert scaled.metadata["scale_factor"] == -2.0
    assert v.to("cpu").vector.device.type == "cpu"
    assert v.to(torch.float64).vector.dtype == torch.float64
    with pytest.raises(ValueError, match="norm"):
        SteeringVector("x", 0, torch.zeros(4), "m").normalize()


def test_save_load_bit_exact(tmp_path):
    v = make_vector()
    v.save(tmp_path / "vec")
    assert (tmp_path / "vec.safetensors").exists() and (tmp_path / "vec.json").exists()
    for name in ("vec", "vec.json", "vec.safetensors"):
        loaded = SteeringVector.load(tmp_path / name)
        assert torch.equal(loaded.vector, v.vector) and loaded.vector.dtype == v.vector.dtype
        assert loaded.metadata == v.metadata
        assert (loaded.behavior, loaded.layer_index, loaded.model_name, loaded.extraction_method) == (
            v.behavior, v.layer_index, v.model_name, v.extraction_method)


def test_reference_layout_loads(tmp_path):
    """The reference package writes NAME.json + NAME.pt (torch.save of the tensor)."""
    tensor = torch.randn(32, dtype=torch.bfloat16)
    torch.save(tensor, tmp_path / "layer_5.pt")
    sidecar = {"behavior": "refusal", "layer_index": 5, "model_name": "Qwen/Qwen3-8B",
               "extraction_method": "caa", "metadata": {"num_pairs": 3}, "vector_shape": [32]}
    (tmp_path / "layer_5.json").write_text(json.dumps(sidecar))
    (tmp_path / "metadata.json").write_text(json.dumps({"behavior": "refusal", "layers": [5],
                                                        "model_name": "Qwen/Qwen3-8B"}))
    loaded = SteeringVectorSet.load(tmp_path)
    assert loaded.layers == [5] and torch.equal(loaded[5].vector, tensor)
    assert SteeringVector.load(tmp_path / "layer_5.pt").metadata["num_pairs"] == 3


def test_set_members_and_round_trip(tmp_path):
    vectors = SteeringVectorSet("refusal", [make_vector(4, seed=1), make_vector(2, seed=2)])
    vectors.add(make_vector(7, seed=3))
    assert len(vectors) == 3 and vectors.layers == [2, 4, 7] and 4 in vectors
    assert vectors.get(4) is vectors[4] and vectors.get(99) is None
    with pytest.raises(KeyError, match="99"):
        vectors[99]
    assert vectors.get_best().norm == max(v.norm for v in vectors)
    assert vectors.get_best("norm") is vectors.get_best()
    with pytest.raises(ValueError, match="metric"):
        vectors.get_best("nonsense")
    assert [v.layer_index for v in vectors] == [4, 2, 7]
    assert vectors.model_name == "tiny/model"
    assert vectors.to(torch.float16)[2].vector.dtype == torch.float16
    vectors.save(tmp_path / "set")
    loaded = SteeringVectorSet.load(tmp_path / "set")
    assert loaded.layers == vectors.layers and loaded.behavior == "refusal"
    for layer in vectors.layers:
        assert torch.equal(loaded[layer].vector, vectors[layer].vector)
        assert loaded[layer].metadata == vectors[layer].metadata
    with pytest.raises(ValueError, match="behavior"):
        vectors.add(make_vector(behavior="humor"))
    with pytest.raises(ValueError, match="empty"):
        SteeringVectorSet("x").get_best()


def test_corrupt_files_give_clear_errors(tmp_path):
    v = make_vector()
    v.save(tmp_path / "v")
    (tmp_path / "v.safetensors").write_bytes(b"\x00\x01garbage")
    with pytest.raises(ValueError, match="safetensors"):
        SteeringVector.load(tmp_path / "v")
    v.save(tmp_path / "w")
    (tmp_path / "w.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        SteeringVector.load(tmp_path / "w")
    v.save(tmp_path / "x")
    meta = json.loads((tmp_path / "x.json").read_text())
    meta["vector_shape"] = [99]
    (tmp_path / "x.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="shape"):
        SteeringVector.load(tmp_path / "x")
    with pytest.raises(FileNotFoundError):
        SteeringVector.load(tmp_path / "missing")


def test_pickle_payload_never_runs(tmp_path):
    """A .pt file is a pickle: loading must refuse anything but tensors."""
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save(Payload(), tmp_path / "evil.pt")
    (tmp_path / "evil.json").write_text(json.dumps({"behavior": "b", "layer_index": 0, "model_name": "m"}))
    with pytest.raises(ValueError, match="evil.pt"):
        SteeringVector.load(tmp_path / "evil")
    assert not marker.exists()
