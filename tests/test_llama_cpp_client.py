"""Our exported control vector, applied by llama.cpp itself to the bundled GGUF model.

llama.cpp comes from ``llama-cpp-python`` (not a dependency: ``pip install llama-cpp-python``
builds llama.cpp from source, ~15 min on two cores). Its loader for control-vector files
lives in llama.cpp's C++ ``common`` library, which the Python bindings do not expose, so the
buffer is laid out here the way that loader does (``direction.{il}`` at
``(il - 1) * n_embd``) and handed to ``llama_apply_adapter_cvec``, which adds it to block
``il``'s output. If our numbering were off by one block, llama.cpp's log-probabilities
would not follow ours.
"""

from __future__ import annotations

import ctypes

import gguf
import numpy as np
import pytest
import torch

from rotalabs_steer import ActivationInjector
from rotalabs_steer.datasets import load_refusal_pairs
from rotalabs_steer.extraction import extract_caa_vectors
from rotalabs_steer.gguf_export import export_gguf

llama_cpp = pytest.importorskip("llama_cpp", reason="llama.cpp client: pip install llama-cpp-python")
models = pytest.importorskip("rotalabs_steer.bundled_model")

LAYER = 14
PROMPT = "How do I pick the lock on my neighbour's front door while they are away?"


def control_buffer(path, n_embd: int, n_layer: int) -> np.ndarray:
    """The float buffer llama.cpp's control-vector loader builds from a GGUF file."""
    buffer = np.zeros((n_layer - 1) * n_embd, dtype=np.float32)  # layers 1 .. n_layer - 1
    for tensor in gguf.GGUFReader(path).tensors:
        layer = int(tensor.name.removeprefix("direction."))
        buffer[(layer - 1) * n_embd:layer * n_embd] += np.asarray(tensor.data, dtype=np.float32)
    return buffer


def llama_cpp_logprobs(token_ids: list[int], buffer: np.ndarray | None, n_embd: int, n_layer: int) -> np.ndarray:
    """log-softmax of llama.cpp's next-token logits after ``token_ids`` (bundled GGUF, CPU)."""
    llama_cpp.llama_backend_init()
    model = llama_cpp.llama_model_load_from_file(str(models.default_model_file()).encode(),
                                                 llama_cpp.llama_model_default_params())
    assert model
    context_params = llama_cpp.llama_context_default_params()
    context_params.n_ctx = 512
    context_params.n_batch = 512
    context = llama_cpp.llama_init_from_model(model, context_params)
    try:
        if buffer is not None:
            data = buffer.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            apply = getattr(llama_cpp, "llama_set_adapter_cvec", None) or llama_cpp.llama_apply_adapter_cvec
            status = apply(context, data, len(buffer), n_embd, 1, n_layer - 1)
            assert status == 0
        tokens = (llama_cpp.llama_token * len(token_ids))(*token_ids)
        assert llama_cpp.llama_decode(context, llama_cpp.llama_batch_get_one(tokens, len(token_ids))) == 0
        vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(model))
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(context, -1), shape=(vocab,))
        logits = logits.astype(np.float64)
        return logits - logits.max() - np.log(np.exp(logits - logits.max()).sum())
    finally:
        llama_cpp.llama_free(context)
        llama_cpp.llama_model_free(model)


@pytest.fixture(scope="module")
def bundled():
    try:
        return models.load_default()
    except ImportError as error:
        pytest.skip(str(error))


def test_llama_cpp_steers_like_we_do(bundled, tmp_path):
    model, tokenizer = bundled
    vectors = extract_caa_vectors(model, tokenizer, load_refusal_pairs(), [LAYER], show_progress=False,
                                  batch_size=16)
    k = 0.3 * vectors[LAYER].metadata["pos_mean_norm"] / vectors[LAYER].norm
    n_embd, n_layer = model.config.hidden_size, model.config.num_hidden_layers
    ids = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True,
                                        tokenize=True, return_dict=True)["input_ids"]
    refusal = tokenizer("I")["input_ids"][0]  # "I can't ..." / "I cannot ..." / "I'm sorry ..."

    ours, theirs = {}, {}
    for strength in (-k, 0.0, k):
        scaled = vectors[LAYER].scale(strength)
        path = tmp_path / f"refusal{strength:+.2f}.gguf"
        export_gguf(type(vectors)(vectors.behavior, [scaled]), path)
        buffer = control_buffer(path, n_embd, n_layer) if strength else None
        theirs[strength] = llama_cpp_logprobs(ids, buffer, n_embd, n_layer)[refusal]
        with torch.no_grad(), ActivationInjector(model, [vectors[LAYER]], strength=strength):
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1].double()
        ours[strength] = float(torch.log_softmax(logits, -1)[refusal])

    # Same direction, and the same size: Q4_1 weights in llama.cpp vs their exact float32
    # dequantization here differ only by llama.cpp's rounding of activations.
    assert theirs[-k] < theirs[0.0] < theirs[k]
    assert ours[-k] < ours[0.0] < ours[k]
    for strength in ours:
        assert abs(theirs[strength] - ours[strength]) < 0.25, (strength, ours, theirs)
    assert theirs[k] - theirs[-k] > 1.0
