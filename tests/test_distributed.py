"""Extraction over torch.distributed: two gloo ranks on the CPU under torchrun."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from ground_truth import relative_error
from rotalabs_steer import SteeringVectorSet
from rotalabs_steer.datasets import load_refusal_pairs
from rotalabs_steer.extraction import extract_caa_vector, extract_caa_vectors

LAYERS = [1, 3]
WORKER = Path(__file__).with_name("distributed_extract.py")


def extraction_inputs():
    from tiny_models import make_model, make_tokenizer

    pairs = [{"positive": p.positive, "negative": p.negative} for p in list(load_refusal_pairs())[:11]]
    return make_model("llama", seed=3), make_tokenizer(), pairs


def run_torchrun(out_dir: Path, mode: str, worker: Path = WORKER) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(worker), str(out_dir), mode]
    # Own process group, so a hung rendezvous takes the workers down with torchrun.
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        out, err = process.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        out, err = process.communicate()
        pytest.fail("torchrun did not finish in 180 s:\n" + out[-3000:] + err[-3000:])
    assert process.returncode == 0, out[-3000:] + err[-3000:]


@pytest.fixture(scope="module")
def single_process():
    model, tokenizer, pairs = extraction_inputs()
    return extract_caa_vectors(model, tokenizer, pairs, LAYERS, "mean", show_progress=False, batch_size=3)


@pytest.mark.slow  # two torchrun launches
@pytest.mark.parametrize("mode", ["auto", "explicit"])
def test_two_ranks_equal_one_process(tmp_path, single_process, mode):
    run_torchrun(tmp_path, mode)
    ranks = [SteeringVectorSet.load(tmp_path / f"rank{r}") for r in (0, 1)]
    for layer in LAYERS:
        want = single_process[layer]
        for got in ranks:
            assert relative_error(got[layer].vector, want.vector.double()) <= 1e-6
            assert got[layer].metadata["num_positive"] == want.metadata["num_positive"] == 11
            assert got[layer].metadata["world_size"] == 2
            assert got[layer].metadata["num_pairs"] == 11
        # Identical on both ranks, bit for bit, separation figures included.
        assert torch.equal(ranks[0][layer].vector, ranks[1][layer].vector)
        stamped = [{k: v for k, v in r[layer].metadata.items() if k != "created_at"} for r in ranks]
        assert stamped[0] == stamped[1]
        assert ranks[0][layer].metadata["separation_sample_size"] == want.metadata["separation_sample_size"]
    if mode == "auto":
        local = SteeringVectorSet.load(tmp_path / "rank0-local")
        assert local[LAYERS[0]].metadata["num_positive"] == 2 and "world_size" not in local[LAYERS[0]].metadata


def test_process_group_without_init_is_a_clear_error():
    assert not dist.is_initialized()
    model, tokenizer, pairs = extraction_inputs()
    with pytest.raises(ValueError, match="process_group was given, but torch.distributed is not initialised"):
        extract_caa_vector(model, tokenizer, pairs, 1, show_progress=False, process_group=object())
