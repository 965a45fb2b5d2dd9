"""The rotalabs-steer command, run in-process on a tiny model saved to disk."""

from __future__ import annotations

import json

import pytest
import torch

from rotalabs_steer import SteeringVectorSet
from rotalabs_steer.cli import main
from rotalabs_steer.datasets import EvaluationDataset, load_evaluation_prompts
from rotalabs_steer.gguf_export import import_gguf
from tiny_models import HIDDEN, make_model, make_tokenizer

PROG = "rotalabs-steer"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny") / "model"
    make_model("llama").save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def vectors_dir(model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("vectors") / "refusal"
    assert main(["extract", "--model", str(model_dir), "--pairs", "refusal", "--layers", "1-3",
                 "--batch-size", "8", "--out", str(out)]) == 0
    return out


def run(capsys, *argv):
    status = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return status, out, err


def assert_one_line_error(status, err, message):
    assert status == 2
    errors = [line for line in err.splitlines() if line.startswith(f"{PROG}:")]
    assert len(errors) == 1 and errors[0].startswith(f"{PROG}: error: "), err
    assert message in errors[0], errors[0]
    assert "Traceback" not in err


@pytest.mark.parametrize("command", [[], ["extract"], ["info"], ["sweep"], ["export-gguf"]])
def test_help(capsys, command):
    status, out, _ = run(capsys, *command, "--help")
    assert status == 0 and out.startswith("usage: rotalabs-steer")
    if command == ["extract"]:
        for option in ("--model", "--pairs", "--layers", "--token-position", "--batch-size", "--out"):
            assert option in out


def test_extract_saves_the_set_and_a_plot(model_dir, vectors_dir):
    loaded = SteeringVectorSet.load(vectors_dir)
    assert loaded.behavior == "refusal" and loaded.layers == [1, 2, 3]
    assert loaded[2].dim == HIDDEN and loaded[2].metadata["batch_size"] == 8
    assert (vectors_dir / "layers.png").stat().st_size > 0
    for layer in (1, 2, 3):
        assert (vectors_dir / f"projections_layer{layer}.png").stat().st_size > 0


def test_extract_prints_the_layer_table(model_dir, tmp_path, capsys):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("\n".join(json.dumps({"user": f"question {i}?", "positive": f"No way {i}.",
                                           "negative": f"Sure, {i}."}) for i in range(6)))
    status, out, _ = run(capsys, "extract", "--model", model_dir, "--pairs", pairs, "--behavior", "custom",
                         "--layers", "0,2-3", "--token-position", "mean", "--out", tmp_path / "out")
    assert status == 0
    lines = out.splitlines()
    assert lines[0].split() == ["layer", "norm", "accuracy", "cohens_d"]
    assert [line.split()[0] for line in lines[1:4]] == ["0", "2", "3"]
    assert "saved 3 custom vectors (6 pairs)" in out
    loaded = SteeringVectorSet.load(tmp_path / "out")
    assert loaded.behavior == "custom" and loaded[0].metadata["token_position"] == "mean"


def test_info(vectors_dir, capsys):
    status, out, _ = run(capsys, "info", vectors_dir)
    assert status == 0
    assert "behavior: refusal" in out and "layers:   1, 2, 3" in out
    header = next(line for line in out.splitlines() if line.lstrip().startswith("layer "))
    assert header.split()[:4] == ["layer", "dim", "norm", "method"]


def test_sweep(model_dir, vectors_dir, tmp_path, capsys):
    status, out, _ = run(capsys, "sweep", vectors_dir, "--model", model_dir, "--layer", "2",
                         "--strengths", "-4,0,4", "--max-new-tokens", "3", "--plot", tmp_path / "sweep.png")
    assert status == 0
    lines = out.splitlines()
    assert lines[0].startswith("refusal vector of layer 2")
    assert lines[1].split() == ["strength", "refusal_logprob", "refusal_log_odds", "refusal_rate", "perplexity"]
    assert [line.split()[0] for line in lines[2:5]] == ["-4.000", "0.000", "4.000"]
    assert (tmp_path / "sweep.png").stat().st_size > 0


def test_sweep_on_own_prompts_and_ab_items(model_dir, vectors_dir, tmp_path, capsys):
    EvaluationDataset("refusal", load_evaluation_prompts("refusal")[:2]).save(tmp_path / "prompts.json")
    status, out, _ = run(capsys, "sweep", vectors_dir, "--model", model_dir, "--strengths", "1",
                         "--prompts", tmp_path / "prompts.json", "--max-new-tokens", "2")
    assert status == 0 and ", 2 prompts" in out.splitlines()[0]
    items = tmp_path / "ab.jsonl"
    items.write_text(json.dumps({"question": "Help?\n(A) yes\n(B) no", "answer_matching_behavior": "(A)",
                                 "answer_not_matching_behavior": "(B)"}))
    status, out, _ = run(capsys, "sweep", vectors_dir, "--model", model_dir, "--layer", "3", "--strengths",
                         "-1,1", "--ab", items, "--behavior", "helpfulness", "--max-new-tokens", "2")
    assert status == 0
    assert out.splitlines()[1].split() == ["strength", "matching_probability", "perplexity"]


def test_sweep_with_relative_strengths(model_dir, vectors_dir, tmp_path, capsys):
    """--relative reads strengths in activation norms: 0.5 of the norm is the same sweep as the
    absolute strength 0.5 x activation_norm / |v|."""
    EvaluationDataset("refusal", load_evaluation_prompts("refusal")[:2]).save(tmp_path / "prompts.json")
    vector = SteeringVectorSet.load(vectors_dir)[3]
    absolute = 0.5 * vector.metadata["activation_norm"] / vector.norm
    common = ["--model", model_dir, "--layer", "3", "--prompts", tmp_path / "prompts.json", "--max-new-tokens", "2"]
    status, relative_out, _ = run(capsys, "sweep", vectors_dir, "--relative", "--strengths", "0.5", *common)
    assert status == 0
    status, absolute_out, _ = run(capsys, "sweep", vectors_dir, "--strengths", f"{absolute!r}", *common)
    assert status == 0
    relative_row, absolute_row = relative_out.splitlines()[2].split()[1:], absolute_out.splitlines()[2].split()[1:]
    assert relative_row == absolute_row


def test_export_gguf(vectors_dir, tmp_path, capsys):
    status, out, _ = run(capsys, "export-gguf", vectors_dir, tmp_path / "refusal.gguf", "--model-hint", "llama")
    assert status == 0 and "direction.1, direction.2, direction.3" in out
    saved, exported = SteeringVectorSet.load(vectors_dir), import_gguf(tmp_path / "refusal.gguf", "refusal")
    assert exported.layers == saved.layers and exported.model_name == "llama"
    for layer in saved.layers:
        assert torch.equal(exported[layer].vector, saved[layer].vector)


@pytest.mark.parametrize("argv, message", [
    (["info", "{tmp}/missing"], "no metadata.json in"),
    (["sweep", "{tmp}/missing"], "no metadata.json in"),
    (["export-gguf", "{tmp}/missing", "{tmp}/v.gguf"], "no metadata.json in"),
    (["extract", "--model", "{model}", "--pairs", "refusal", "--layers", "3-1", "--out", "{tmp}/o"],
     "argument --layers: layer range '3-1' runs backwards"),
    (["extract", "--model", "{model}", "--pairs", "refusal", "--layers", "1-x", "--out", "{tmp}/o"],
     "argument --layers: '1-x' is not a layer"),
    (["extract", "--model", "{model}", "--pairs", "refusal", "--layers", "2-9", "--out", "{tmp}/o"],
     "layer 4 is out of range for a model with 4 blocks"),
    (["extract", "--model", "{model}", "--pairs", "refusals", "--out", "{tmp}/o"],
     "--pairs 'refusals' is neither a file nor a shipped behaviour (refusal, "),
    (["extract", "--model", "{tmp}/no-model", "--pairs", "refusal", "--out", "{tmp}/o"],
     "no such model folder"),
    pytest.param(["extract", "--model", "{model}", "--pairs", "refusal", "--device", "cuda", "--out", "{tmp}/o"],
                 "argument --device: 'cuda': this torch build has no usable cuda device",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is there"), id="cuda-missing"),
    (["extract", "--model", "{model}", "--pairs", "refusal", "--device", "tpu9", "--out", "{tmp}/o"],
     "argument --device: 'tpu9' is not a torch device"),
    (["extract", "--model", "no-such-model", "--pairs", "refusal", "--out", "{tmp}/o"],
     "--model no-such-model: not a loadable model folder nor a model in the local Hugging Face cache"),
    (["extract", "--model", "{model}", "--pairs", "refusal", "--out", "{model}/config.json"],
     "is not a folder"),
    (["extract", "--model", "{model}", "--pairs", "refusal", "--batch-size", "0", "--out", "{tmp}/o"],
     "argument --batch-size: '0' is not a positive integer"),
    (["extract", "--pairs", "refusal"], "the following arguments are required: --out"),
    (["sweep", "{vectors}", "--model", "{model}", "--strengths", "-1,x"], "argument --strengths: '-1,x'"),
    (["sweep", "{vectors}", "--model", "{model}", "--layer", "-1"], "--layer -1: the set has layers [1, 2, 3]"),
    (["sweep", "{vectors}", "--model", "{model}", "--behavior", "humor"], "'humor' has no built-in score"),
    (["sweep", "{vectors}", "--model", "{model}", "--ab", "{tmp}/ab.json"], "--ab {tmp}/ab.json: no such file"),
    ([], "the following arguments are required: COMMAND"),
    (["steer"], "invalid choice: 'steer'"),
])
def test_bad_inputs_are_one_line_errors(argv, message, model_dir, vectors_dir, tmp_path_factory, capsys):
    tmp = tmp_path_factory.getbasetemp() / "errors"
    tmp.mkdir(exist_ok=True)
    argv = [a.format(tmp=tmp, model=model_dir, vectors=vectors_dir) for a in argv]
    status, _, err = run(capsys, *argv)
    assert_one_line_error(status, err, message.format(tmp=tmp))


def test_export_of_layer_zero_is_refused(model_dir, tmp_path, capsys):
    status, _, _ = run(capsys, "extract", "--model", model_dir, "--pairs", "refusal", "--layers", "0",
                       "--out", tmp_path / "zero")
    assert status == 0
    status, _, err = run(capsys, "export-gguf", tmp_path / "zero", tmp_path / "zero.gguf")
    assert_one_line_error(status, err, "layer(s) [0] cannot be exported")
    assert not (tmp_path / "zero.gguf").exists()
