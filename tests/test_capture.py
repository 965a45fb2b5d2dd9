"""The forward stops after the deepest block; the model comes back exactly as it was."""

from __future__ import annotations

import pytest
import torch

from rotalabs_steer import _core
from rotalabs_steer.extraction.batching import make_batches
from rotalabs_steer.extraction.device_reduce import DeviceReducer
from rotalabs_steer.extraction import extract_caa_vector, extract_caa_vectors
from rotalabs_steer.layers import find_decoder_blocks
from tiny_models import NUM_LAYERS, make_model, make_tokenizer


def all_hook_counts(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def logits(model, tokenizer):
    ids = torch.tensor([tokenizer("User: is this still the same model?")["input_ids"]])
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_later_blocks_and_lm_head_never_run(kind, pairs):
    model, tokenizer = make_model(kind), make_tokenizer()
    blocks = find_decoder_blocks(model).modules
    ran = {"later_block": 0, "lm_head": 0, "requested": 0}
    model.get_output_embeddings().register_forward_hook(lambda *a: ran.__setitem__("lm_head", ran["lm_head"] + 1))
    blocks[2].register_forward_hook(lambda *a: ran.__setitem__("later_block", ran["later_block"] + 1))
    blocks[1].register_forward_hook(lambda *a: ran.__setitem__("requested", ran["requested"] + 1))
    extract_caa_vectors(model, tokenizer, pairs, [0, 1], show_progress=False, batch_size=4, share_prefix=False)
    assert ran == {"later_block": 0, "lm_head": 0, "requested": 4}  # 16 texts / 4 per batch


def test_model_restored_after_success(pairs):
    model, tokenizer = make_model("llama"), make_tokenizer()
    model.train()
    model.model.layers[1].eval()  # a mixed state must come back as it was
    flags = [m.training for m in model.modules()]
    before_hooks = all_hook_counts(model)
    extract_caa_vectors(model, tokenizer, pairs, [0, 2], show_progress=False, batch_size=3)
    assert [m.training for m in model.modules()] == flags
    assert all_hook_counts(model) == before_hooks == 0


@pytest.mark.parametrize("exception", [RuntimeError("boom inside the forward"), KeyboardInterrupt()])
def test_model_restored_after_exception_in_forward(exception, pairs):
    model, tokenizer = make_model("qwen3"), make_tokenizer()
    expected = logits(model, tokenizer)
    calls = {"n": 0}

    def explode(module, args):
        calls["n"] += 1
        if calls["n"] == 2:  # the second batch, after the first has been accumulated
            raise exception

    handle = model.model.layers[1].register_forward_pre_hook(explode)
    with pytest.raises(type(exception)):
        extract_caa_vectors(model, tokenizer, pairs, [0, 3], show_progress=False, batch_size=4)
    handle.remove()
    assert all_hook_counts(model) == 0
    assert not model.training
    torch.testing.assert_close(logits(model, tokenizer), expected, rtol=0, atol=0)


def test_device_row_collector_matches_c_selection():
    """The device path (rows picked and summed by torch, one transfer at the end) equals the C path."""
    torch.manual_seed(0)
    token_ids = [[5, 6, 7, 8, 9], [5, 6], [7, 8, 9], [1]]
    for position in ("last", "first", "mean"):
        batch = next(make_batches(token_ids, [0, 1, 0, 1], position, 4, pad_id=0))
        hidden = torch.randn(4, batch.input_ids.shape[1], 16)
        direct, collected = _core.Accumulator(1, 16), _core.Accumulator(1, 16)
        if batch.read_index is not None:
            direct.add(0, hidden, batch.groups, index=batch.read_index)
        else:
            direct.add(0, hidden, batch.groups, mask=batch.attention_mask)
        reducer = DeviceReducer(1, collected.num_groups, 16, total_rows=4)
        reducer.begin(batch)
        reducer(0, hidden)
        reducer.merge_into(collected)
        np_direct, np_collected = direct.state()[0], collected.state()[0]
        assert abs(np_direct - np_collected).max() < 1e-5, position
        assert (direct.state()[1] == collected.state()[1]).all()


def test_capture_hook_routes_unreadable_devices_to_collector():
    accumulator = _core.Accumulator(1, 4)
    accumulator.set_batch(torch.tensor([0]), index=torch.tensor([0]))
    seen = []

    class FakeCudaTensor:
        def __dlpack_device__(self):
            return (2, 0)

    hook = _core.CaptureHook(accumulator, 0, device_rows=lambda slot, t: seen.append((slot, t)))
    fake = FakeCudaTensor()
    hook(None, (), fake)
    assert seen == [(0, fake)]
    hook(None, (), torch.ones(1, 3, 4))  # a CPU tensor still goes straight to C
    assert accumulator.state()[1][0, 0] == 1 and len(seen) == 1


def test_meta_device_model_is_refused(pairs):
    with torch.device("meta"):
        model = make_model("llama")
    with pytest.raises(ValueError, match="meta"):
        extract_caa_vector(model, make_tokenizer(), pairs, 1, show_progress=False)
    assert all_hook_counts(model) == 0


def test_last_block_is_reachable(pairs):
    model = make_model("gpt2")
    vector = extract_caa_vector(model, make_tokenizer(), pairs, NUM_LAYERS - 1, show_progress=False)
    assert vector.norm > 0


def test_tokenize_in_chunks_equals_one_call(monkeypatch):
    import rotalabs_steer.extraction.batching as batching
    from rotalabs_steer.datasets import load_refusal_pairs

    tokenizer = make_tokenizer()
    texts = load_refusal_pairs().positives[:20]
    monkeypatch.setattr(batching, "TOKENIZE_CHUNK", 7)
    ids, read = batching.tokenize(tokenizer, texts, 40)
    assert read is None
    assert ids == [tokenizer(text, truncation=True, max_length=40)["input_ids"] for text in texts]
