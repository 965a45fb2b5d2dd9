"""Bad inputs to extraction, steering, vector files and datasets: a clear error, a clean model.

Every case in CASES must raise the listed ValueError / TypeError / IndexError with a message
that names the argument (or file) and says what was expected. After every case, and after
the cases that must work, the model has no forward hooks or pre-hooks on any module, gives
bit-identical logits, keeps every module's training flag, and the tokenizer's padding_side,
truncation_side, pad_token and model_max_length are unchanged.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from ground_truth import caa_truth, relative_error
from rotalabs_steer import SteeringVector, SteeringVectorSet
from rotalabs_steer.datasets import ContrastPair, ContrastPairDataset, load_pairs
from rotalabs_steer.extraction import extract_caa_vector, extract_caa_vectors
from rotalabs_steer.steering import ActivationInjector, MultiVectorInjector
from tiny_models import HIDDEN, NUM_LAYERS, hook_count, make_model, make_tokenizer, refusal_pairs

PROBE = "User: is this still the same model?"


# ----------------------------------------------------------------------------- environment


class Wrapper(nn.Module):
    """A plain module around a model: no config, blocks at an unknown path."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, **kwargs):
        return self.inner(**kwargs)


def _poisoned(value: float, block: int) -> nn.Module:
    """A tiny Llama whose block ``block`` outputs non-finite values (its MLP weight is poisoned)."""
    model = make_model("llama")
    with torch.no_grad():
        model.model.layers[block].mlp.down_proj.weight[0, 0] = value
    return model


def _no_pad_tokenizer():
    tokenizer = make_tokenizer(pad=False)
    tokenizer.eos_token = None
    assert tokenizer.pad_token_id is None and tokenizer.eos_token_id is None
    return tokenizer


@pytest.fixture(scope="module")
def models() -> dict[str, tuple[nn.Module, Any]]:
    llama = make_model("llama")
    with torch.device("meta"):
        meta = make_model("llama")
    return {
        "llama": (llama, make_tokenizer()),
        "nopad": (llama, _no_pad_tokenizer()),
        "wrapper": (Wrapper(make_model("llama", seed=1)), make_tokenizer()),
        "meta": (meta, make_tokenizer()),
        "inf1": (_poisoned(float("inf"), 1), make_tokenizer()),
        "nan2": (_poisoned(float("nan"), 2), make_tokenizer()),
    }


@dataclass
class Env:
    model: nn.Module
    tok: Any
    pairs: list[dict]
    tmp: Path



# ------------------------------------------------------------------------- model snapshot



def global_hook_count() -> int:
    from torch.nn.modules import module as module_mod

    return len(module_mod._global_forward_hooks) + len(module_mod._global_forward_pre_hooks)


def logits_bits(model: nn.Module, tokenizer) -> torch.Tensor | None:
    """The logits' bit patterns (NaN-safe equality); None for a model without weights."""
    if any(p.device.type == "meta" for p in model.parameters()):
        return None
    ids = torch.tensor([make_tokenizer()(PROBE)["input_ids"]])
    with torch.no_grad():
        out = model(input_ids=ids)
    return out.logits.detach().clone().view(torch.int32)


def snapshot(model: nn.Module, tokenizer) -> dict:
    return {
        "hooks": hook_count(model),
        "global_hooks": global_hook_count(),
        "training": [m.training for m in model.modules()],
        "devices": sorted({p.device.type for p in model.parameters()}),
        "tokenizer": tuple(getattr(tokenizer, k, None) for k in (
            "padding_side", "truncation_side", "pad_token", "model_max_length", "eos_token")),
        "logits": logits_bits(model, tokenizer),
    }


def assert_unchanged(before: dict, model: nn.Module, tokenizer) -> None:
    after = snapshot(model, tokenizer)
    assert after["hooks"] == 0 and before["hooks"] == 0, "forward hooks left on the model"
    assert after["global_hooks"] == before["global_hooks"]
    assert after["training"] == before["training"]
    assert after["devices"] == before["devices"]
    assert after["tokenizer"] == before["tokenizer"]
    if before["logits"] is None:
        assert after["logits"] is None
    else:
        assert torch.equal(after["logits"], before["logits"]), "logits changed"


# -------------------------------------------------------------------------------- helpers


_DEFAULT = object()


def E(env: Env, pairs=_DEFAULT, layer=1, **kwargs):
    """extract_caa_vector with the case's model and tokenizer (and four pairs by default)."""
    kwargs.setdefault("show_progress", False)
    return extract_caa_vector(env.model, env.tok, env.pairs if pairs is _DEFAULT else pairs, layer, **kwargs)


def ES(env: Env, layers, pairs=_DEFAULT, **kwargs):
    kwargs.setdefault("show_progress", False)
    return extract_caa_vectors(env.model, env.tok, env.pairs if pairs is _DEFAULT else pairs, layers, **kwargs)


def vec(layer=1, dim=HIDDEN, fill=None, dtype=torch.float32, behavior="refusal") -> SteeringVector:
    generator = torch.Generator().manual_seed(layer + 7)
    tensor = torch.randn(dim, generator=generator) if fill is None else torch.full((dim,), fill)
    return SteeringVector(behavior, layer, tensor.to(dtype), "tiny")


def vset(*vectors: SteeringVector) -> SteeringVectorSet:
    return SteeringVectorSet(vectors[0].behavior, list(vectors))


def saved_vector(env: Env, mutate: Callable[[Path], None]) -> Path:
    """A vector saved under env.tmp, then damaged by ``mutate(base)``; returns the base path."""
    base = env.tmp / "vec" / "layer_1"
    vec(8, dim=8).save(base)
    mutate(base)
    return base


def saved_set(env: Env, mutate: Callable[[Path], None]) -> Path:
    directory = env.tmp / "set"
    vset(vec(0, dim=8), vec(2, dim=8)).save(directory)
    mutate(directory)
    return directory


def edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def write(path: Path, content: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    return path


def dataset_file(env: Env, pairs: list, name="pairs.json") -> Path:
    return write(env.tmp / name, json.dumps({"behavior": "b", "pairs": pairs}))


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


# ---------------------------------------------------------------------------------- cases


@dataclass
class Case:
    id: str
    call: Callable[[Env], Any]
    error: type
    match: str
    env: str = "llama"


CASES = [
    # --- contrast pairs
    Case("pairs_empty_list", lambda e: E(e, []), ValueError, r"contrast_pairs is empty.*at least one"),
    Case("pairs_empty_dataset", lambda e: E(e, ContrastPairDataset("b")), ValueError, r"contrast_pairs is empty"),
    Case("pairs_empty_generator", lambda e: E(e, (p for p in [])), ValueError, r"contrast_pairs is empty"),
    Case("pair_missing_negative", lambda e: E(e, [{"positive": "a b"}]), ValueError,
         r"contrast_pairs\[0\]: missing 'negative'"),
    Case("pair_missing_positive", lambda e: E(e, [*e.pairs[:1], {"negative": "a b"}]), ValueError,
         r"contrast_pairs\[1\]: missing 'positive'"),
    Case("pair_missing_both", lambda e: E(e, [{"text": "a"}]), ValueError,
         r"contrast_pairs\[0\]: missing 'positive' and 'negative'"),
    Case("text_empty", lambda e: E(e, [{"positive": "", "negative": "b"}]), ValueError,
         r"contrast_pairs\[0\]: ContrastPair\.positive is empty"),
    Case("text_whitespace", lambda e: E(e, [{"positive": "a", "negative": " \n\t"}]), ValueError,
         r"contrast_pairs\[0\]: ContrastPair\.negative is empty"),
    Case("text_int", lambda e: E(e, [{"positive": 3, "negative": "b"}]), TypeError,
         r"contrast_pairs\[0\]: ContrastPair\.positive must be a str, not int"),
    Case("text_none", lambda e: E(e, [{"positive": "a", "negative": None}]), TypeError,
         r"contrast_pairs\[0\]: ContrastPair\.negative must be a str, not NoneType"),
    Case("text_bytes", lambda e: E(e, [{"positive": b"a", "negative": "b"}]), TypeError,
         r"ContrastPair\.positive must be a str, not bytes"),
    Case("pair_is_tuple", lambda e: E(e, [("a", "b")]), TypeError,
         r"contrast_pairs\[0\]: expected a dict with 'positive' and 'negative', got tuple"),
    Case("pairs_is_dict", lambda e: E(e, {"positive": "a", "negative": "b"}), TypeError,
         r"contrast_pairs must be a ContrastPairDataset or a list of .* not dict"),
    Case("pairs_is_str", lambda e: E(e, "positive"), TypeError, r"contrast_pairs must be .* not str"),
    Case("pairs_is_none", lambda e: E(e, None), TypeError, r"contrast_pairs must be .* not NoneType"),
    Case("dataset_with_bad_entry", lambda e: E(e, ContrastPairDataset("b", [ContrastPair("a", "b"), None])),
         TypeError, r"contrast_pairs\[1\]: expected a dict"),
    Case("answer_without_metadata", lambda e: E(e, token_position="answer"), ValueError,
         r"contrast_pairs\[0\]: token_position='answer' needs metadata 'positive_answer_char'"),
    # --- layers
    Case("layer_too_large", lambda e: E(e, layer=NUM_LAYERS), IndexError,
         rf"layer_idx: layer {NUM_LAYERS} is out of range .*\[-{NUM_LAYERS}, {NUM_LAYERS - 1}\]"),
    Case("layer_too_negative", lambda e: E(e, layer=-NUM_LAYERS - 1), IndexError,
         rf"layer_idx: layer -{NUM_LAYERS + 1} is out of range"),
    Case("layer_float", lambda e: E(e, layer=1.0), TypeError, r"layer_idx must be an int, got 1\.0 \(float\)"),
    Case("layer_str", lambda e: E(e, layer="1"), TypeError, r"layer_idx must be an int, got '1' \(str\)"),
    Case("layer_bool", lambda e: E(e, layer=True), TypeError, r"layer_idx must be an int, got True"),
    Case("layer_none", lambda e: E(e, layer=None), TypeError, r"layer_idx must be an int, got None"),
    Case("layer_list_to_single", lambda e: E(e, layer=[1, 2]), TypeError,
         r"layer_idx must be a single int; use extract_caa_vectors"),
    Case("layers_duplicate", lambda e: ES(e, [1, 1]), ValueError, r"layer_indices names layer\(s\) \[1\] more than once"),
    Case("layers_duplicate_negative", lambda e: ES(e, [NUM_LAYERS - 1, -1]), ValueError,
         rf"layer_indices names layer\(s\) \[{NUM_LAYERS - 1}\] more than once"),
    Case("layers_empty", lambda e: ES(e, []), ValueError, r"layer_indices must name at least one layer"),
    Case("batch_size_as_sixth_positional", lambda e: extract_caa_vectors(e.model, e.tok, e.pairs, [1], "last", 16),
         TypeError, r"show_progress must be a bool, got 16; batch_size .* keyword-only"),
    Case("layers_scalar", lambda e: ES(e, 1), TypeError, r"layer_indices must be a list of ints, not int"),
    Case("layers_string", lambda e: ES(e, "12"), TypeError, r"layer_indices must be a list of ints, not str"),
    Case("layers_float_entry", lambda e: ES(e, [0, 1.5]), TypeError, r"layer_indices\[1\] must be an int, got 1\.5"),
    Case("layers_out_of_range_entry", lambda e: ES(e, [0, 99]), IndexError, r"layer_indices\[1\]: layer 99 is out of range"),
    Case("layer_modules_no_match", lambda e: E(e, layer_modules="model.nothing.{i}"), ValueError,
         r"layer_modules template 'model\.nothing\.\{i\}' matches no module"),
    Case("layer_modules_foreign_module", lambda e: E(e, layer=0, layer_modules=[nn.Linear(HIDDEN, HIDDEN)]),
         ValueError, r"layer_modules\[0\] is not a submodule of the model"),
    Case("layer_modules_empty_list", lambda e: E(e, layer_modules=[]), TypeError,
         r"layer_modules must be a path template or a non-empty list of nn\.Module"),
    Case("layer_modules_no_placeholder", lambda e: E(e, layer_modules="model.layers"), ValueError,
         r"layer_modules template must contain '\{i\}'"),
    # --- options
    Case("token_position_unknown", lambda e: E(e, token_position="middle"), ValueError,
         r"token_position must be one of \('last', 'first', 'mean', 'answer'\), got 'middle'"),
    Case("token_position_none", lambda e: E(e, token_position=None), ValueError, r"token_position must be one of"),
    Case("batch_size_zero", lambda e: E(e, batch_size=0), ValueError, r"batch_size must be a positive int, got 0"),
    Case("batch_size_negative", lambda e: E(e, batch_size=-3), ValueError, r"batch_size must be a positive int, got -3"),
    Case("batch_size_float", lambda e: E(e, batch_size=2.0), TypeError, r"batch_size must be a positive int, got 2\.0"),
    Case("batch_size_str", lambda e: E(e, batch_size="4"), TypeError, r"batch_size must be a positive int, got '4'"),
    Case("batch_size_bool", lambda e: E(e, batch_size=True), TypeError, r"batch_size must be a positive int, got True"),
    Case("batch_size_none", lambda e: E(e, batch_size=None), TypeError, r"batch_size must be a positive int, got None"),
    Case("batch_size_vectors_float", lambda e: ES(e, [0, 1], batch_size=2.5), TypeError, r"batch_size must be"),
    Case("max_length_zero", lambda e: E(e, max_length=0), ValueError, r"max_length must be a positive int, got 0"),
    Case("separation_sample_negative", lambda e: E(e, separation_sample=-1), ValueError,
         r"separation_sample must be an int >= 0, got -1"),
    # --- model and tokenizer
    Case("model_none", lambda e: extract_caa_vector(None, e.tok, e.pairs, 1, show_progress=False), TypeError,
         r"model must be a torch\.nn\.Module, not NoneType"),
    Case("model_blocks_not_found", lambda e: E(e), ValueError,
         r"cannot find the decoder blocks of Wrapper.*pass layer_modules=", env="wrapper"),
    Case("model_on_meta_device", lambda e: E(e), ValueError, r"model has parameters on the 'meta' device", env="meta"),
    Case("tokenizer_none", lambda e: extract_caa_vector(e.model, None, e.pairs, 1, show_progress=False), TypeError,
         r"tokenizer must be a HuggingFace tokenizer .* not NoneType"),
    Case("tokenizer_name_string", lambda e: extract_caa_vector(e.model, "gpt2", e.pairs, 1, show_progress=False),
         TypeError, r"tokenizer must be .* not str"),
    Case("tokenizer_without_pad_or_eos", lambda e: E(e, batch_size=2), ValueError,
         r"tokenizer has neither pad_token_id nor eos_token_id.*set tokenizer\.pad_token.*batch_size=1", env="nopad"),
    Case("tokenizer_vocab_larger_than_model", lambda e: _small_vocab_extract(e), ValueError,
         r"tokenizer produced token id \d+, but the model's input embedding has 16 rows"),
    Case("max_length_beyond_positions", lambda e: _short_positions_extract(e, "gpt2"), ValueError,
         r"max_length=64 lets a text reach \d+ tokens, but the model has learned absolute positions for 8 "
         r"tokens only; pass max_length <= 8"),
    Case("max_length_beyond_opt_positions", lambda e: _short_positions_extract(e, "opt"), ValueError,
         r"max_length=64 lets a text reach \d+ tokens, but the model has learned absolute positions for 8 "
         r"tokens only; pass max_length <= 8"),
    # --- non-finite activations
    Case("activations_inf_middle_block", lambda e: ES(e, [0, 1, NUM_LAYERS - 1], batch_size=2), ValueError,
         r"activations at layer 1 contain NaN or inf.*no vector was produced", env="inf1"),
    Case("activations_nan_requested_block", lambda e: E(e, layer=2, batch_size=3), ValueError,
         r"activations at layer 2 contain NaN or inf", env="nan2"),
    Case("activations_nan_later_block", lambda e: ES(e, [0, 3]), ValueError,
         r"activations at layer 3 contain NaN or inf", env="nan2"),
    # --- ActivationInjector
    Case("inject_wrong_dim", lambda e: ActivationInjector(e.model, [vec(dim=HIDDEN + 3)]), ValueError,
         rf"vectors\[0\]: vector has {HIDDEN + 3} dimensions but the model's hidden size is {HIDDEN}"),
    Case("inject_nan", lambda e: ActivationInjector(e.model, [vec(fill=float("nan"))]), ValueError,
         r"vectors\[0\]: vector contains NaN or inf"),
    Case("inject_inf_second", lambda e: ActivationInjector(e.model, [vec(0), vec(2, fill=float("-inf"))]), ValueError,
         r"vectors\[1\]: vector contains NaN or inf"),
    Case("inject_layer_too_large", lambda e: ActivationInjector(e.model, [vec(NUM_LAYERS)]), IndexError,
         rf"vectors\[0\]: layer {NUM_LAYERS} is out of range .*expected a layer in \[-{NUM_LAYERS}, {NUM_LAYERS - 1}\]"),
    Case("inject_layer_too_negative", lambda e: ActivationInjector(e.model, vset(vec(-NUM_LAYERS - 2))), IndexError,
         rf"vectors\[0\]: layer -{NUM_LAYERS + 2} is out of range"),
    Case("inject_empty", lambda e: ActivationInjector(e.model, []), ValueError, r"vectors is empty"),
    Case("inject_none", lambda e: ActivationInjector(e.model, None), TypeError,
         r"vectors must be a SteeringVector, a list of them or a SteeringVectorSet, not NoneType"),
    Case("inject_raw_tensor", lambda e: ActivationInjector(e.model, torch.randn(HIDDEN)), TypeError,
         r"vectors must be a SteeringVector.* not Tensor"),
    Case("inject_list_of_tensors", lambda e: ActivationInjector(e.model, [torch.randn(HIDDEN)]), TypeError,
         r"vectors\[0\] must be a SteeringVector, not Tensor"),
    Case("inject_two_for_one_layer", lambda e: ActivationInjector(e.model, [vec(1), vec(1 - NUM_LAYERS)]), ValueError,
         r"vectors: two vectors for layer 1"),
    Case("inject_integer_vector", lambda e: ActivationInjector(e.model, [vec(dtype=torch.int64)]), TypeError,
         r"vectors\[0\]: vector must be a floating-point tensor, not torch\.int64"),
    Case("inject_meta_vector", lambda e: ActivationInjector(
        e.model, [SteeringVector("r", 1, torch.empty(HIDDEN, device="meta"), "m")]), ValueError,
        r"vectors\[0\]: vector is on the 'meta' device"),
    Case("inject_strength_nan", lambda e: ActivationInjector(e.model, [vec()], strength=float("nan")), TypeError,
         r"strength must be a finite number, got nan"),
    Case("inject_strength_str", lambda e: ActivationInjector(e.model, [vec()], strength="2"), TypeError,
         r"strength must be a finite number, got '2'"),
    Case("inject_mode_unknown", lambda e: ActivationInjector(e.model, [vec()], injection_mode="middle"), ValueError,
         r"injection_mode must be one of \('all', 'last', 'first'\), got 'middle'"),
    Case("inject_apply_to_unknown", lambda e: ActivationInjector(e.model, [vec()], apply_to="sometimes"), ValueError,
         r"apply_to must be one of"),
    Case("inject_operator_unknown", lambda e: ActivationInjector(e.model, [vec()], operator="multiply"), ValueError,
         r"operator must be one of \('add', 'ablate', 'clamp'\)"),
    Case("inject_ablate_zero", lambda e: ActivationInjector(e.model, [vec(fill=0.0)], operator="ablate"), ValueError,
         r"vectors\[0\]: cannot ablate a zero vector"),
    Case("inject_blocks_not_found", lambda e: ActivationInjector(e.model, [vec()]), ValueError,
         r"cannot find the decoder blocks of Wrapper", env="wrapper"),
    Case("inject_model_none", lambda e: ActivationInjector(None, [vec()]), TypeError, r"model must be a torch\.nn\.Module"),
    # --- MultiVectorInjector
    Case("multi_wrong_dim", lambda e: MultiVectorInjector(e.model, {"r": vset(vec(dim=3))}), ValueError,
         rf"vector_sets\['r'\]: vector has 3 dimensions but the model's hidden size is {HIDDEN}"),
    Case("multi_nan", lambda e: MultiVectorInjector(e.model, {"r": vset(vec(fill=float("nan")))}), ValueError,
         r"vector_sets\['r'\]: vector contains NaN or inf"),
    Case("multi_layer_out_of_range", lambda e: MultiVectorInjector(e.model, {"r": vset(vec(7))}), IndexError,
         r"vector_sets\['r'\]: layer 7 is out of range"),
    Case("multi_not_a_set", lambda e: MultiVectorInjector(e.model, {"r": [vec()]}), TypeError,
         r"vector_sets\['r'\] must be a SteeringVectorSet"),
    Case("multi_not_a_mapping", lambda e: MultiVectorInjector(e.model, [vset(vec())]), TypeError,
         r"vector_sets must be a dict of behavior -> SteeringVectorSet"),
    Case("multi_strengths_list", lambda e: MultiVectorInjector(e.model, {"r": vset(vec())}, strengths=[1.0]), TypeError,
         r"strengths must be a dict of behavior -> float, not list"),
    Case("multi_strength_inf", lambda e: MultiVectorInjector(e.model, {"r": vset(vec())}, strengths={"r": float("inf")}),
         TypeError, r"strengths\['r'\] must be a finite number, got inf"),
    Case("multi_default_layer_str", lambda e: MultiVectorInjector(e.model, {"r": vset(vec())}, default_layer="1"),
         TypeError, r"default_layer must be an int, got '1'"),
    Case("multi_default_layer_out_of_range", lambda e: MultiVectorInjector(e.model, {"r": vset(vec())}, default_layer=9),
         IndexError, r"default_layer: layer 9 is out of range for a model with 4 blocks"),
    # --- SteeringVector.load
    Case("vector_truncated_safetensors", lambda e: SteeringVector.load(
        saved_vector(e, lambda b: truncate(b.with_suffix(".safetensors")))), ValueError,
        r"layer_1\.safetensors: not a readable safetensors file"),
    Case("vector_garbage_safetensors", lambda e: SteeringVector.load(
        saved_vector(e, lambda b: write(b.with_suffix(".safetensors"), bytes(range(256)) * 2))), ValueError,
        r"layer_1\.safetensors: not a readable safetensors file"),
    Case("vector_empty_safetensors", lambda e: SteeringVector.load(
        saved_vector(e, lambda b: write(b.with_suffix(".safetensors"), b""))), ValueError,
        r"layer_1\.safetensors: not a readable safetensors file"),
    Case("vector_corrupted_data_nan", lambda e: SteeringVector.load(saved_vector(e, lambda b: write(
        b.with_suffix(".safetensors"), b.with_suffix(".safetensors").read_bytes()[:-4] + b"\xff\xff\xff\x7f")).with_suffix(
        ".json")), ValueError, r"layer_1: the stored vector contains NaN or inf"),
    Case("vector_wrong_tensor_name", lambda e: SteeringVector.load(saved_vector(
        e, lambda b: save_file({"weights": torch.ones(8)}, str(b.with_suffix(".safetensors"))))), ValueError,
        r"layer_1\.safetensors: expected one tensor named 'vector', found \['weights'\]"),
    Case("vector_2d_tensor", lambda e: SteeringVector.load(saved_vector(
        e, lambda b: save_file({"vector": torch.ones(2, 4)}, str(b.with_suffix(".safetensors"))))), ValueError,
        r"layer_1: expected a 1-D floating-point tensor"),
    Case("vector_integer_tensor", lambda e: SteeringVector.load(saved_vector(
        e, lambda b: save_file({"vector": torch.arange(8)}, str(b.with_suffix(".safetensors"))))), ValueError,
        r"layer_1: expected a 1-D floating-point tensor"),
    Case("vector_shape_mismatch", lambda e: SteeringVector.load(saved_vector(
        e, lambda b: edit_json(b.with_suffix(".json"), vector_shape=[9]))), ValueError,
        r"layer_1: tensor has shape \[8\] but layer_1\.json says \[9\]"),
    Case("vector_shape_not_a_list", lambda e: SteeringVector.load(saved_vector(
        e, lambda b: edit_json(b.with_suffix(".json"), vector_shape="8"))), ValueError,
        r"layer_1\.json: field 'vector_shape' must be a list of sizes"),
    Case("vector_truncated_json", lambda e: SteeringVector.load(saved_vector(
        e, lambda b: truncate(b.with_suffix(".json")))), ValueError, r"layer_1\.json: not valid JSON"),
    Case("vector_json_not_utf8", lambda e: SteeringVector.load(saved_vector(
        e, lambda b: write(b.with_suffix(".json"), b"\xff\xfe{"))), ValueError, r"layer_1\.json: not valid JSON"),
    Case("vector_json_is_list", lambda e: SteeringVector.load(saved_vector(
        e, lambda b: write(b.with_suffix(".json"), "[]"))), ValueError, r"layer_1\.json: expected a JSON object"),
    Case("vector_json_layer_str", lambda e: SteeringVector.load(saved_vector(
        e, lambda b: edit_json(b.with_suffix(".json"), layer_index="1"))), ValueError,
        r"layer_1\.json: field 'layer_index' must be a int, got '1'"),
    Case("vector_json_no_behavior", lambda e: SteeringVector.load(saved_vector(
        e, lambda b: edit_json(b.with_suffix(".json"), behavior=None))), ValueError,
        r"layer_1\.json: field 'behavior' must be a str"),
    Case("vector_json_method_int", lambda e: SteeringVector.load(saved_vector(
        e, lambda b: edit_json(b.with_suffix(".json"), extraction_method=5))), ValueError,
        r"layer_1\.json: field 'extraction_method' must be a str, got 5"),
    Case("vector_json_metadata_list", lambda e: SteeringVector.load(saved_vector(
        e, lambda b: edit_json(b.with_suffix(".json"), metadata=[1]))), ValueError,
        r"layer_1\.json: field 'metadata' must be an object"),
    Case("vector_bad_pt_file", lambda e: SteeringVector.load(saved_vector(e, lambda b: (
        b.with_suffix(".safetensors").unlink(), write(b.with_suffix(".pt"), b"not a pickle")))), ValueError,
        r"layer_1\.pt: not a loadable tensor file"),
    # --- SteeringVectorSet.load
    Case("set_truncated_metadata", lambda e: SteeringVectorSet.load(saved_set(
        e, lambda d: truncate(d / "metadata.json", 0.3))), ValueError, r"metadata\.json: not valid JSON"),
    Case("set_layers_not_a_list", lambda e: SteeringVectorSet.load(saved_set(
        e, lambda d: edit_json(d / "metadata.json", layers="0,2"))), ValueError,
        r"metadata\.json: expected \{'behavior': str, 'layers': \[int, \.\.\.\]\}"),
    Case("set_duplicate_layers", lambda e: SteeringVectorSet.load(saved_set(
        e, lambda d: edit_json(d / "metadata.json", layers=[0, 2, 0]))), ValueError,
        r"metadata\.json: 'layers' lists layer\(s\) \[0\] more than once"),
    Case("set_layer_index_mismatch", lambda e: SteeringVectorSet.load(saved_set(
        e, lambda d: edit_json(d / "layer_2.json", layer_index=0))), ValueError,
        r"layer_2\.json has layer_index 0"),
    Case("set_behavior_mismatch", lambda e: SteeringVectorSet.load(saved_set(
        e, lambda d: edit_json(d / "metadata.json", behavior="humor"))), ValueError,
        r"vector behavior 'refusal' != set behavior 'humor'"),
    Case("set_mixed_hidden_sizes", lambda e: SteeringVectorSet.load(saved_set(
        e, lambda d: vec(2, dim=5).save(d / "layer_2"))), ValueError,
        r"layer_2 has 5 dimensions but layer_0 has 8; the files are from different models"),
    Case("set_truncated_member", lambda e: SteeringVectorSet.load(saved_set(
        e, lambda d: truncate(d / "layer_2.safetensors"))), ValueError,
        r"layer_2\.safetensors: not a readable safetensors file"),
    # --- datasets
    Case("dataset_missing_negative", lambda e: ContrastPairDataset.load(dataset_file(
        e, [{"positive": "a", "negative": "b"}, {"positive": "a"}])), ValueError,
        r"pairs\.json: pair 1: missing 'negative'"),
    Case("dataset_text_not_str", lambda e: ContrastPairDataset.load(dataset_file(
        e, [{"positive": ["a"], "negative": "b"}])), TypeError,
        r"pairs\.json: pair 0: ContrastPair\.positive must be a str, not list"),
    Case("dataset_record_null", lambda e: ContrastPairDataset.load(dataset_file(e, [None])), TypeError,
         r"pairs\.json: pair 0: expected a dict with 'positive' and 'negative', got NoneType"),
    Case("dataset_metadata_not_dict", lambda e: ContrastPairDataset.load(dataset_file(
        e, [{"positive": "a", "negative": "b", "metadata": "x"}])), TypeError,
        r"pairs\.json: pair 0: 'metadata' must be a dict"),
    Case("dataset_truncated", lambda e: ContrastPairDataset.load(write(
        e.tmp / "cut.json", json.dumps({"behavior": "b", "pairs": [{"positive": "a", "negative": "b"}]})[:25])),
        ValueError, r"cut\.json: not valid JSON"),
    Case("dataset_no_pairs_list", lambda e: ContrastPairDataset.load(write(e.tmp / "top.json", "[1, 2]")),
         ValueError, r"top\.json: expected an object with a 'pairs' list"),
    Case("load_pairs_empty_text", lambda e: load_pairs(dataset_file(e, [{"positive": "a", "negative": "  "}])),
         ValueError, r"pairs\.json pair 0: ContrastPair\.negative is empty"),
    Case("load_pairs_bad_jsonl_line", lambda e: load_pairs(write(
        e.tmp / "p.jsonl", '{"positive": "a", "negative": "b"}\n{"positive": "a", "negative": \n')), ValueError,
        r"p\.jsonl line 2: not valid JSON"),
    Case("load_pairs_jsonl_missing_side", lambda e: load_pairs(write(
        e.tmp / "q.jsonl", '{"positive": "a", "negative": "b"}\n\n{"positive": "c"}\n')), ValueError,
        r"q\.jsonl line 3: missing 'negative'"),
    Case("load_pairs_not_utf8", lambda e: load_pairs(write(e.tmp / "latin.json", "é".encode("latin-1"))),
         ValueError, r"latin\.json: not UTF-8 text"),
    Case("load_pairs_empty_list", lambda e: load_pairs([]), ValueError, r"source is an empty list"),
]


def _small_vocab_extract(env: Env):
    """A model whose embedding is smaller than the tokenizer's vocabulary."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=16, hidden_size=HIDDEN, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    model = LlamaForCausalLM(config).eval()
    try:
        return extract_caa_vector(model, env.tok, env.pairs, 1, show_progress=False)
    finally:
        assert hook_count(model) == 0


def _short_positions_extract(env: Env, kind: str):
    """A GPT-2 or OPT with 8 learned positions, and texts longer than that."""
    from transformers import GPT2Config, GPT2LMHeadModel, OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    if kind == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=512, n_embd=HIDDEN, n_layer=2, n_head=4, n_positions=8))
    else:
        model = OPTForCausalLM(OPTConfig(vocab_size=512, hidden_size=HIDDEN, num_hidden_layers=2, ffn_dim=128,
                                         num_attention_heads=4, max_position_embeddings=8, word_embed_proj_dim=HIDDEN))
    model.eval()
    try:
        return extract_caa_vector(model, env.tok, env.pairs, 1, show_progress=False, max_length=64)
    finally:
        assert hook_count(model) == 0


def test_at_least_thirty_distinct_cases():
    assert len(CASES) >= 30
    assert len({c.id for c in CASES}) == len(CASES)


@pytest.mark.filterwarnings("ignore:.*truncated:UserWarning")
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, models, tmp_path):
    model, tokenizer = models[case.env]
    before = snapshot(model, tokenizer)
    env = Env(model, tokenizer, refusal_pairs(4), tmp_path)
    with pytest.raises(case.error, match=case.match) as info:
        case.call(env)
    assert type(info.value) in (ValueError, TypeError, IndexError), type(info.value)
    assert_unchanged(before, model, tokenizer)


# ------------------------------------------------------------------- inputs that must work


def checked(models, name="llama"):
    """(model, tokenizer, check): call check() to assert the model came back unchanged."""
    model, tokenizer = models[name]
    before = snapshot(model, tokenizer)
    return model, tokenizer, lambda: assert_unchanged(before, model, tokenizer)


def test_generator_of_pairs_works_like_a_list(models):
    model, tokenizer, check = checked(models)
    pairs = refusal_pairs(4)
    from_list = extract_caa_vector(model, tokenizer, pairs, 1, show_progress=False, batch_size=3)
    from_generator = extract_caa_vector(model, tokenizer, (p for p in pairs), 1, show_progress=False, batch_size=3)
    assert torch.equal(from_generator.vector, from_list.vector)
    assert from_generator.metadata["num_pairs"] == 4
    dataset = ContrastPairDataset("refusal", [{"positive": p["positive"], "negative": p["negative"]} for p in pairs])
    from_dataset = extract_caa_vector(model, tokenizer, dataset, 1, show_progress=False, batch_size=3)
    assert torch.equal(from_dataset.vector, from_list.vector) and from_dataset.behavior == "refusal"
    check()


def test_unsorted_layers_work_and_are_keyed_by_layer(models):
    model, tokenizer, check = checked(models)
    pairs = refusal_pairs(4)
    unsorted = extract_caa_vectors(model, tokenizer, pairs, [3, 0, -3], show_progress=False, batch_size=2)
    ordered = extract_caa_vectors(model, tokenizer, pairs, [0, 1, 3], show_progress=False, batch_size=2)
    assert unsorted.layers == ordered.layers == [0, 1, 3]
    for layer in (0, 1, 3):
        assert unsorted[layer].layer_index == layer
        assert torch.equal(unsorted[layer].vector, ordered[layer].vector)
    single = extract_caa_vector(model, tokenizer, pairs, 1, show_progress=False, batch_size=2)
    torch.testing.assert_close(unsorted[1].vector, single.vector, rtol=1e-6, atol=1e-7)
    check()


def test_tokenizer_without_pad_or_eos_works_with_batch_size_1(models):
    model, tokenizer, check = checked(models, "nopad")
    pairs = refusal_pairs(4)
    got = extract_caa_vector(model, tokenizer, pairs, 2, show_progress=False, batch_size=1)
    want = extract_caa_vector(model, make_tokenizer(), pairs, 2, show_progress=False, batch_size=1)
    torch.testing.assert_close(got.vector, want.vector, rtol=1e-6, atol=1e-7)
    # equal lengths need no padding: a batch of one text repeated is fine too
    same = [{"positive": "User: hello there", "negative": "User: hello there"}] * 2
    extract_caa_vector(model, tokenizer, same, 2, show_progress=False, batch_size=4)
    check()


@pytest.mark.parametrize("truncation_side", ["right", "left"])
def test_texts_longer_than_max_length_truncate_like_the_reference(models, truncation_side):
    model, tokenizer, check = checked(models)
    tokenizer = make_tokenizer()
    tokenizer.truncation_side = truncation_side
    before = snapshot(model, tokenizer)
    # the replies only: texts that differ within their first (and last) 12 tokens
    pairs = [{k: v.split("Assistant: ", 1)[1] for k, v in p.items()} for p in refusal_pairs(4)]
    max_length = 12
    lengths = [len(tokenizer(p[side])["input_ids"]) for p in pairs for side in ("positive", "negative")]
    assert all(n > max_length for n in lengths)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        vectors = extract_caa_vectors(model, tokenizer, pairs, [1, 3], "mean", show_progress=False,
                                      batch_size=3, max_length=max_length)
    truncation = [w for w in caught if "truncated" in str(w.message)]
    assert len(truncation) == 1, [str(w.message) for w in caught]
    assert issubclass(truncation[0].category, UserWarning)
    assert "8 text(s)" in str(truncation[0].message) and f"max_length={max_length}" in str(truncation[0].message)
    truth = caa_truth(model, tokenizer, pairs, [1, 3], "mean", max_length=max_length)
    for layer in (1, 3):
        assert relative_error(vectors[layer].vector, truth[layer]) <= 1e-5
    assert_unchanged(before, model, tokenizer)
    check()


def test_no_warning_when_nothing_is_truncated(models):
    model, tokenizer, check = checked(models)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        extract_caa_vector(model, tokenizer, refusal_pairs(4), 1, show_progress=False, batch_size=2)
    check()


def test_non_finite_activations_never_give_a_vector(models):
    """Layers before the poisoned block are fine alone; any layer from it on is an error."""
    model, tokenizer, check = checked(models, "inf1")
    fine = extract_caa_vectors(model, tokenizer, refusal_pairs(4), [0], show_progress=False, batch_size=2)
    assert torch.isfinite(fine[0].vector).all()
    for layers, named in (([1], 1), ([2], 2), ([0, 3], 3)):
        with pytest.raises(ValueError, match=rf"activations at layer {named} contain NaN or inf"):
            extract_caa_vectors(model, tokenizer, refusal_pairs(4), layers, show_progress=False, batch_size=2)
    check()


def test_missing_files_raise_file_not_found(tmp_path, models):
    model, tokenizer, check = checked(models)
    with pytest.raises(FileNotFoundError, match="no steering-vector metadata"):
        SteeringVector.load(tmp_path / "nothing")
    vec(1, dim=8).save(tmp_path / "v")
    (tmp_path / "v.safetensors").unlink()  # save() writes both tensor files
    (tmp_path / "v.pt").unlink()
    with pytest.raises(FileNotFoundError, match=r"no steering-vector tensor at .*v\.safetensors or .*v\.pt"):
        SteeringVector.load(tmp_path / "v")
    with pytest.raises(FileNotFoundError, match="no metadata.json"):
        SteeringVectorSet.load(tmp_path / "empty")
    check()


def test_injectors_still_steer_after_rejections(models):
    """The rejected constructions above left nothing behind: a valid injector attaches and detaches."""
    model, tokenizer, check = checked(models)
    ids = torch.tensor([make_tokenizer()(PROBE)["input_ids"]])
    with torch.no_grad():
        plain = model(input_ids=ids).logits
        with ActivationInjector(model, [vec(1)], strength=2.0):
            assert hook_count(model) > 0
            steered = model(input_ids=ids).logits
        with MultiVectorInjector(model, {"r": vset(vec(2))}, {"r": 0.0}, default_layer=2):
            unsteered = model(input_ids=ids).logits
    assert not torch.equal(plain, steered)
    assert torch.equal(plain, unsteered)
    check()


# ------------------------------------------------- C core regressions (found by fuzz/fuzz_core.py)


@pytest.mark.parametrize("corruption", [{"version": (0, 1)}, {"version": (2, 0)}, {"name": b"not_a_tensor"}])
def test_rejected_capsule_dropped_by_the_core_keeps_its_error(corruption):
    """The core drops a capsule it refuses while the error is pending; the producer's
    destructor (Python code here) must neither see nor lose it (was: SystemError)."""
    import numpy as np

    import dlpack_fakes as fk
    from rotalabs_steer import _core

    fake = fk.FakeTensor(np.ones((2, 3), np.float32), **corruption)
    acc = _core.Accumulator(1, 3)
    with pytest.raises(BufferError, match="activations: (unsupported DLPack major version|expected a DLPack capsule)"):
        acc.add(0, fk.Producer(fake.take_capsule()), np.array([0, 1]))
    assert fake.destructor_calls == 1  # dropped inside the call
    assert fake.deleter_calls == (0 if "name" in corruption else 1)  # freed once, by the producer's destructor
    assert acc.state()[1].sum() == 0


def test_load_state_with_a_negative_count_changes_nothing():
    import numpy as np

    from rotalabs_steer import _core

    acc = _core.Accumulator(1, 2)
    acc.add(0, np.ones((2, 2)), np.array([0, 1]))
    sums, counts = acc.state()
    with pytest.raises(ValueError, match=r"counts\[0, 1\] is negative"):
        acc.load_state(np.full((1, 2, 2), 7.0), np.array([[5, -1]]))
    after_sums, after_counts = acc.state()
    assert np.array_equal(after_sums, sums) and np.array_equal(after_counts, counts)


def test_capture_hook_with_device_rows_reads_a_bare_capsule():
    """A bare capsule has no __dlpack_device__: the DLPack reader judges it (was: AttributeError)."""
    import numpy as np

    from rotalabs_steer import _core

    acc = _core.Accumulator(1, 2)
    acc.set_batch(np.array([0]))
    routed = []
    hook = _core.CaptureHook(acc, 0, device_rows=lambda slot, t: routed.append(slot))
    hook(None, (), np.full((1, 2), 3.0).__dlpack__())
    assert routed == [] and acc.state()[0][0, 0].tolist() == [3.0, 3.0]
    with pytest.raises(TypeError, match="activations must be a tensor or array that supports DLPack"):
        hook(None, (), object())
