"""What every benchmark driver shares: read the job, load the model, time, write results.

A driver runs in the virtual environment of the system it measures (ours: .venv; the
peers: bench/.venvs/NAME), so this module needs only the standard library, torch, numpy
and transformers, and never imports rotalabs_steer (whose name two systems share).

Job file (JSON, written by bench/run_bench.py):
  system          "ours" | "bare-full" | "bare-stopped" | "reference" | "steering-vectors"
  model_dir       an ordinary Hugging Face model directory (weights + tokenizer)
  pairs_file      JSON list of {"positive": str, "negative": str}
  behavior        label for the pair set
  layers          decoder blocks to read (block outputs)
  token_position  "last" | "mean"
  batch_size      texts per forward where the system batches
  repeats         timed runs (one untimed warm-up precedes them: the first pair; on a GPU all pairs)
  threads         torch intra-op threads
  device, dtype   e.g. "cpu", "float32" / "cuda", "bfloat16"
  out_dir         where result.json and vectors.npy go

Result (out_dir/result.json): wall time of every timed run, peak RSS of the process
(ru_maxrss, KiB), RSS right after the model loaded, peak accelerator memory, versions,
and vectors.npy: float64 [len(layers), hidden], rows in job["layers"] order (a system making
several methods writes vectors_METHOD.npy for each and lists them under "methods").
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path


def read_job() -> dict:
    if len(sys.argv) != 2:
        raise SystemExit(f"usage: {sys.argv[0]} JOB.json")
    return json.loads(Path(sys.argv[1]).read_text())


def setup(job: dict):
    """Threads and quiet logging; returns the torch module."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch
    import transformers

    torch.set_num_threads(int(job["threads"]))
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return torch


def load_model(job: dict):
    """(model, tokenizer) from job["model_dir"], in job["dtype"] on job["device"], eval mode."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = getattr(torch, job["dtype"])
    model = AutoModelForCausalLM.from_pretrained(job["model_dir"], dtype=dtype, local_files_only=True)
    model = model.to(job["device"]).eval()
    tokenizer = AutoTokenizer.from_pretrained(job["model_dir"], local_files_only=True)
    return model, tokenizer


def load_pairs(job: dict) -> list[tuple[str, str]]:
    records = json.loads(Path(job["pairs_file"]).read_text())
    return [(r["positive"], r["negative"]) for r in records]


def current_rss_kib() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


def run(job: dict, extract, versions: dict | None = None) -> None:
    """Load, warm up, time ``extract(model, tokenizer, pairs)`` job["repeats"] times, write results.

    ``extract`` returns {layer: 1-D tensor} or None (bare forwards).
    """
    torch = setup(job)
    model, tokenizer = load_model(job)
    rss_loaded = current_rss_kib()
    pairs = load_pairs(job)
    cuda = job["device"].startswith("cuda")

    def sync():
        if cuda:
            torch.cuda.synchronize()

    # Warm-up, untimed: first calls, allocator, kernels. On a GPU on every pair (cheap there),
    # so that each batch shape's first-use costs (kernel choice, allocator growth) stay out.
    start = time.perf_counter()
    extract(model, tokenizer, pairs if cuda else pairs[:1])
    sync()
    warmup = time.perf_counter() - start
    if cuda:
        torch.cuda.reset_peak_memory_stats()

    times, vectors = [], None
    for _ in range(int(job["repeats"])):
        sync()
        start = time.perf_counter()
        vectors = extract(model, tokenizer, pairs)
        sync()
        times.append(time.perf_counter() - start)
        print(f"  {job['system']}: {times[-1]:.3f} s", file=sys.stderr, flush=True)

    out = Path(job["out_dir"])
    out.mkdir(parents=True, exist_ok=True)
    methods = None
    if vectors is not None:
        import numpy as np

        # {layer: vector}, or {method: {layer: vector}} from a system that makes several methods
        methods = sorted(vectors) if all(isinstance(key, str) for key in vectors) else None
        for method, per_layer in ({m: vectors[m] for m in methods} if methods else {"": vectors}).items():
            rows = [per_layer[layer].detach().to("cpu", torch.float64).numpy() for layer in job["layers"]]
            np.save(out / (f"vectors_{method}.npy" if method else "vectors.npy"), np.stack(rows))
    import transformers

    result = {
        "system": job["system"],
        "times_s": times,
        "warmup_s": warmup,
        "peak_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        "rss_after_load_kib": rss_loaded,
        "peak_device_mem_bytes": torch.cuda.max_memory_allocated() if cuda else None,
        "vectors": "vectors.npy" if vectors is not None and not methods else None,
        "methods": methods,
        "threads": torch.get_num_threads(),
        "versions": {"python": sys.version.split()[0], "torch": torch.__version__,
                     "transformers": transformers.__version__, **(versions or {})},
    }
    (out / "result.json").write_text(json.dumps(result, indent=2))


def package_version(name: str) -> str:
    from importlib.metadata import version

    return version(name)
