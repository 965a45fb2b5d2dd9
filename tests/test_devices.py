"""Half-precision models, models dispatched with a device_map (offload included), and CUDA."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from arch_zoo import ARCHITECTURES
from ground_truth import caa_truth, relative_error
from rotalabs_steer.extraction import extract_caa_vector, extract_caa_vectors
from rotalabs_steer.steering import ActivationInjector
from tiny_models import make_model, make_tokenizer, refusal_pairs

# Float64 truth of the same (rounded) weights; the model itself computes in its own dtype,
# so the error scales with the dtype's epsilon times the activations' size.
EPSILON = {torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7}
CUDA = torch.cuda.is_available()



def hook_counts(model) -> list[int]:
    return [len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_half_precision_models(name, dtype):
    model = ARCHITECTURES[name]().to(dtype)
    tokenizer = make_tokenizer()
    want = caa_truth(model, tokenizer, refusal_pairs(), [2], "last")[2]
    got = extract_caa_vector(model, tokenizer, refusal_pairs(), 2, "last", show_progress=False, batch_size=3)
    assert got.vector.dtype == torch.float32 and got.metadata["model_dtype"] == str(dtype).removeprefix("torch.")
    error = float((got.vector.double() - want).norm()) / got.metadata["pos_mean_norm"]
    # GPT-OSS's router picks its top experts in the model dtype: a near-tie that rounds the
    # other way sends a row to other experts (same error with batch_size=1: the model's own).
    allowed = (8 if name == "gpt_oss" else 2) * EPSILON[dtype]
    assert error <= allowed, f"{name}: error {error:.2e} of the activation norm"


@pytest.fixture(scope="module")
def saved_llama(tmp_path_factory):
    model = make_model("llama", seed=5)
    folder = tmp_path_factory.mktemp("llama")
    model.save_pretrained(folder)
    return model, folder


def dispatched(folder, device_map: dict, tmp_path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(folder, device_map=device_map, offload_folder=tmp_path / "offload",
                                                dtype=torch.float32).eval()


# Blocks 2 and 3 offloaded to disk: their parameters sit on 'meta' between forwards.
CPU_AND_DISK = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu",
                "model.layers.1": "cpu", "model.layers.2": "disk", "model.layers.3": "disk",
                "model.norm": "cpu", "lm_head": "cpu"}


def test_device_map_with_disk_offload_extracts_and_steers(saved_llama, tmp_path):
    plain, folder = saved_llama
    model = dispatched(folder, CPU_AND_DISK, tmp_path)
    assert any(p.device.type == "meta" for p in model.model.layers[3].parameters())
    tokenizer = make_tokenizer()
    want = extract_caa_vectors(plain, tokenizer, refusal_pairs(), [1, 3], show_progress=False, batch_size=3)
    hooks_before = hook_counts(model)
    got = extract_caa_vectors(model, tokenizer, refusal_pairs(), [1, 3], show_progress=False, batch_size=3)
    for layer in (1, 3):
        assert relative_error(got[layer].vector, want[layer].vector.double()) <= 1e-6
    assert hook_counts(model) == hooks_before

    inputs = tokenizer(["User: hello there\nAssistant:"], return_tensors="pt")
    with torch.no_grad():
        with ActivationInjector(plain, [want[3]], strength=4.0):
            steered_plain = plain(**inputs).logits
        with ActivationInjector(model, [got[3]], strength=4.0):
            steered = model(**inputs).logits
        unsteered = model(**inputs).logits
    torch.testing.assert_close(steered, steered_plain, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(steered, unsteered)
    assert hook_counts(model) == hooks_before


needs_cuda = pytest.mark.gpu  # skipped without CUDA (conftest.py)


@needs_cuda
def test_device_map_split_over_cuda_and_cpu(saved_llama, tmp_path):
    """Blocks on two devices: rows leave each device once per batch; vectors go to each block's device."""
    plain, folder = saved_llama
    split = {"model.embed_tokens": 0, "model.rotary_emb": 0, "model.layers.0": 0, "model.layers.1": 0,
             "model.layers.2": "cpu", "model.layers.3": "cpu", "model.norm": "cpu", "lm_head": "cpu"}
    model = dispatched(folder, split, tmp_path)
    tokenizer = make_tokenizer()
    want = caa_truth(plain, tokenizer, refusal_pairs(), [1, 3], "mean")
    got = extract_caa_vectors(model, tokenizer, refusal_pairs(), [1, 3], "mean", show_progress=False, batch_size=3)
    for layer in (1, 3):
        assert relative_error(got[layer].vector, want[layer]) <= 1e-5

    seen = {}
    def record(index):
        def hook(module, args, output):
            seen[index] = output.device
        return hook
    handles = [model.model.layers[i].register_forward_hook(record(i)) for i in (1, 3)]
    inputs = tokenizer(["User: hello there\nAssistant:"], return_tensors="pt").to("cuda")
    try:
        with torch.no_grad(), ActivationInjector(model, [got[1], got[3]], strength=2.0):
            steered = model(**inputs).logits.cpu()
    finally:
        for handle in handles:
            handle.remove()
    # With a GPU present, accelerate runs "cpu" blocks on the GPU and keeps only their
    # weights on the CPU (offload): hidden states stay on cuda, the weights move per forward.
    assert seen[1].type == "cuda" and seen[3].type == "cuda"
    assert all(p.device.type in ("cpu", "meta") for p in model.model.layers[3].parameters())
    with torch.no_grad(), ActivationInjector(plain, [got[1], got[3]], strength=2.0):
        steered_plain = plain(**inputs.to("cpu")).logits
    torch.testing.assert_close(steered, steered_plain, rtol=1e-4, atol=1e-4)


@needs_cuda
@pytest.mark.parametrize("token_position", ["last", "mean"])
def test_cuda_bfloat16_matches_cpu_float32(token_position):
    """A model of more than 0.5B parameters, built from a config, in bfloat16 on the GPU."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=32000, hidden_size=1536, intermediate_size=4096, num_hidden_layers=16,
                         num_attention_heads=12, num_key_value_heads=4, max_position_embeddings=2048)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    assert sum(p.numel() for p in model.parameters()) > 0.5e9
    # The tiny BPE tokenizer's ids (< 512) are valid ids of this vocabulary.
    tokenizer = make_tokenizer()
    layers = [4, 8, 12]
    cpu = extract_caa_vectors(model, tokenizer, refusal_pairs(16), layers, token_position, show_progress=False,
                              batch_size=8)
    gpu = extract_caa_vectors(model.to("cuda", torch.bfloat16), tokenizer, refusal_pairs(16), layers, token_position,
                              show_progress=False, batch_size=8)
    for layer in layers:
        error = float((gpu[layer].vector - cpu[layer].vector).norm()) / cpu[layer].metadata["pos_mean_norm"]
        # bfloat16 keeps 8 significant bits: errors of a few epsilon of the activations' size.
        assert error <= 4 * EPSILON[torch.bfloat16], f"layer {layer}: {error:.2e}"
        cosine = torch.nn.functional.cosine_similarity(gpu[layer].vector, cpu[layer].vector, dim=0)
        assert cosine >= 0.99
