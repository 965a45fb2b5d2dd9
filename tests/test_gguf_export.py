"""llama.cpp control vectors: bit-exact round trips, layer numbering, metadata, foreign files.

Files are checked with the gguf package's reader, and llama.cpp's way of applying them is
emulated from its sources (see rotalabs_steer.gguf_export); test_llama_cpp_client.py runs
llama.cpp itself where llama-cpp-python is installed.
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from rotalabs_steer import ActivationInjector, SteeringVector, SteeringVectorSet
from rotalabs_steer.gguf_export import export_gguf, import_gguf
from tiny_models import HIDDEN, NUM_LAYERS, make_model, make_tokenizer

LAYERS = (1, 2, 3)


def make_set(layers=LAYERS, dim=HIDDEN, model_name="org/tiny-model") -> SteeringVectorSet:
    generator = torch.Generator().manual_seed(0)
    return SteeringVectorSet("refusal", [
        SteeringVector("refusal", layer, torch.randn(dim, generator=generator) * 0.1, model_name)
        for layer in layers
    ])


def test_round_trip_is_bit_exact(tmp_path):
    original = make_set()
    export_gguf(original, tmp_path / "refusal.gguf")
    loaded = import_gguf(tmp_path / "refusal.gguf", behavior="refusal")
    assert loaded.behavior == "refusal" and loaded.layers == original.layers
    assert loaded.model_name == "org/tiny-model"
    for layer in LAYERS:
        assert loaded[layer].vector.dtype == torch.float32
        assert loaded[layer].vector.numpy().tobytes() == original[layer].vector.numpy().tobytes()


def test_file_layout_as_read_by_the_gguf_reader(tmp_path):
    original = make_set()
    export_gguf(original, tmp_path / "v.gguf")
    reader = gguf.GGUFReader(tmp_path / "v.gguf")
    assert reader.get_field("general.architecture").contents() == "controlvector"
    assert reader.get_field("controlvector.model_hint").contents() == "org/tiny-model"
    count = reader.get_field("controlvector.layer_count")
    assert count.contents() == len(LAYERS) and count.types == [gguf.GGUFValueType.UINT32]
    assert sorted(t.name for t in reader.tensors) == [f"direction.{i}" for i in LAYERS]
    for tensor in reader.tensors:
        layer = int(tensor.name.split(".")[1])
        assert tensor.tensor_type == gguf.GGMLQuantizationType.F32
        assert list(tensor.shape) == [HIDDEN] and tensor.n_elements == HIDDEN
        assert np.array_equal(tensor.data, original[layer].vector.numpy())


def test_model_hint_override_and_other_dtypes(tmp_path):
    halves = SteeringVectorSet("refusal", [v.to(torch.float16) for v in make_set()])
    export_gguf(halves, tmp_path / "v.gguf", model_hint="llama")
    loaded = import_gguf(tmp_path / "v.gguf")
    assert loaded.model_name == "llama" and loaded.behavior == "unknown"
    assert torch.equal(loaded[2].vector, halves[2].vector.float())


def llama_cpp_apply(model, path, scale):
    """llama.cpp's control vector, emulated from its sources.

    common_control_vector_load_one: direction.N goes to data[n_embd * (N - 1)], times the scale.
    llama_adapter_cvec::apply: tensors[il] = data[n_embd * (il - 1)] for il in 1 .. n_layer - 1.
    The model graph: cur = build_cvec(cur, il) on the output of block il (0-based).
    """
    reader = gguf.GGUFReader(path)
    n_layer, n_embd = model.config.num_hidden_layers, model.config.hidden_size
    data = np.zeros(n_embd * (n_layer - 1), dtype=np.float32)
    for tensor in reader.tensors:
        n = int(tensor.name.removeprefix("direction."))
        data[n_embd * (n - 1):n_embd * n] += tensor.data * scale
    tensors = {il: torch.from_numpy(data[n_embd * (il - 1):n_embd * il].copy()) for il in range(1, n_layer)}
    return [model.model.layers[il].register_forward_hook(lambda m, a, out, t=tensors[il]: out + t)
            for il in range(1, n_layer)]


def test_layer_numbering_matches_llama_cpp(tmp_path):
    model, tokenizer = make_model("llama"), make_tokenizer()
    vectors = make_set(layers=(1, NUM_LAYERS - 1))
    export_gguf(vectors, tmp_path / "v.gguf")
    batch = tokenizer(["User: how do I pick a lock?\nAssistant:"], return_tensors="pt")
    with torch.no_grad():
        with ActivationInjector(model, vectors, strength=2.0):
            ours = model(**batch).logits
        handles = llama_cpp_apply(model, tmp_path / "v.gguf", 2.0)
        try:
            theirs = model(**batch).logits
        finally:
            for handle in handles:
                handle.remove()
        shifted = SteeringVectorSet("refusal", [
            SteeringVector("refusal", v.layer_index - 1, v.vector, v.model_name) for v in vectors])
        with ActivationInjector(model, shifted, strength=2.0):
            off_by_one = model(**batch).logits
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(theirs, off_by_one, atol=1e-3)


def test_repeng_style_file_imports(tmp_path):
    """A file as repeng or llama.cpp's cvector-generator writes it (int32 layer count there)."""
    writer = gguf.GGUFWriter(str(tmp_path / "foreign.gguf"), "controlvector")
    writer.add_string("controlvector.model_hint", "mistral")
    writer.add_int32("controlvector.layer_count", 2)
    directions = {5: np.arange(8, dtype=np.float32), 12: -np.ones(8, dtype=np.float32)}
    for layer, direction in directions.items():
        writer.add_tensor(f"direction.{layer}", direction)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    loaded = import_gguf(tmp_path / "foreign.gguf", behavior="honesty")
    assert loaded.layers == [5, 12] and loaded.model_name == "mistral"
    assert np.array_equal(loaded[5].vector.numpy(), directions[5])


@pytest.mark.parametrize("layers, message", [
    ((0, 1), r"layer\(s\) \[0\] cannot be exported"),
    ((-1,), r"layer\(s\) \[-1\] cannot be exported"),
])
def test_export_refuses_layers_llama_cpp_cannot_steer(tmp_path, layers, message):
    with pytest.raises(ValueError, match=message):
        export_gguf(make_set(layers=layers), tmp_path / "v.gguf")
    assert not (tmp_path / "v.gguf").exists()


def test_export_rejects_bad_sets(tmp_path):
    with pytest.raises(TypeError, match="vector_set must be a SteeringVectorSet"):
        export_gguf([make_set()[1]], tmp_path / "v.gguf")
    with pytest.raises(ValueError, match="vector_set is empty"):
        export_gguf(SteeringVectorSet("refusal"), tmp_path / "v.gguf")
    mixed = make_set(layers=(1,))
    mixed.add(SteeringVector("refusal", 2, torch.ones(HIDDEN + 1), "org/tiny-model"))
    with pytest.raises(ValueError, match="different sizes"):
        export_gguf(mixed, tmp_path / "v.gguf")
    infinite = SteeringVectorSet("refusal", [SteeringVector("refusal", 1, torch.full((4,), float("inf")), "m")])
    with pytest.raises(ValueError, match="layer 1 contains NaN or inf"):
        export_gguf(infinite, tmp_path / "v.gguf")


def test_import_rejects_other_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no GGUF file"):
        import_gguf(tmp_path / "missing.gguf")
    (tmp_path / "text.gguf").write_text("not a gguf file")
    with pytest.raises(ValueError, match="not a readable GGUF file"):
        import_gguf(tmp_path / "text.gguf")
    writer = gguf.GGUFWriter(str(tmp_path / "model.gguf"), "llama")
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match="general.architecture is 'llama'"):
        import_gguf(tmp_path / "model.gguf")
