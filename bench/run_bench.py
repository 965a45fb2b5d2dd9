"""Extraction benchmark (issue 7): ours against rotalabs-steer 1.2.0, steering-vectors 0.12.2
and the bare forward, each system in its own process. Run by `make bench`.

Systems (one driver each in bench/peers/, fed the same job: model directory, pairs, layers,
token position, batch size, repeats, threads):
  ours              rotalabs_steer.extraction.extract_caa_vectors(..., batch_size=B)       (.venv)
  reference         rotalabs-steer==1.2.0, its extract_caa_vectors (one text per forward)
                                                            (bench/.venvs/reference)
  steering-vectors  steering-vectors==0.12.2, train_steering_vector with mean_aggregator(),
                    read_token_index=-1, batch_size=B        (bench/.venvs/steering-vectors)
  bare-full         our batches through the model, no hooks, full depth                    (.venv)
  bare-stopped      the same, stopped after the deepest requested block                    (.venv)

--methods runs the estimator section instead (issue 15; bench/results/methods.json):
  ours-methods          collect_pair_statistics once, then caa, pca, pca_diff and fisher  (.venv)
  steering-vectors      mean_aggregator() (one pass, one method)     (bench/.venvs/steering-vectors)
  steering-vectors-pca  pca_aggregator() (another pass)              (bench/.venvs/steering-vectors)
  repeng                repeng==0.4.0 ControlVector.train(method="pca_diff")   (bench/.venvs/repeng)
with the cosine between each peer's vectors and ours of the same method (min over layers),
and ours-methods alone at 64, 256 and 1,024 pairs for peak RSS against the number of pairs.

Every process loads the same float32 weights from an ordinary Hugging Face directory under
bench/.work/ (written here once), with the same torch thread count. Each time is the median
of --repeats timed runs after one untimed warm-up (CPU: the first pair; GPU: all pairs); peak RSS is the
driver process's ru_maxrss (model and imports included). Vectors are compared with ours in
the same run (relative L2 error, max over layers).

Results: one JSON per section in bench/results/ (cpu.json; gpu.json from --gpu-model), and
bench/RESULTS.md + bench/results.png rendered from every JSON present (bench/report.py).
--only re-runs some workloads and keeps the other rows of the section. --quick is a smoke
run (4 pairs, 1 repeat) that writes under bench/.work/quick/ and never touches the above.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import date, datetime
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
WORK = BENCH / ".work"
VENVS = BENCH / ".venvs"
DRIVERS = BENCH / "peers"
sys.path.insert(0, str(REPO))  # ours, also where it is not installed (the GPU machine)

SMOLLM2 = "HuggingFaceTB/SmolLM2-135M-Instruct"
MAX_LENGTH = 512  # what every system truncates at (steering-vectors: no text here is longer)

SYSTEMS = {
    "ours": ("ours", "ours_driver.py"),
    "reference": ("reference", "reference_driver.py"),
    "steering-vectors": ("steering-vectors", "steering_vectors_driver.py"),
    "bare-full": ("ours", "ours_driver.py"),
    "bare-stopped": ("ours", "ours_driver.py"),
    "ours-methods": ("ours", "ours_driver.py"),
    "steering-vectors-pca": ("steering-vectors", "steering_vectors_driver.py"),
    "repeng": ("repeng", "repeng_driver.py"),
}
# The method of ours-methods each peer computes (for the cosine between the same methods).
PEER_METHOD = {"steering-vectors": "caa", "steering-vectors-pca": "pca", "repeng": "pca_diff"}
SYSTEM_TITLES = {
    "ours": "ours (rotalabs_steer, batch_size={bs})",
    "reference": "rotalabs-steer 1.2.0 (reference)",
    "steering-vectors": "steering-vectors 0.12.2 (batch_size={bs})",
    "bare-full": "bare forward, full depth",
    "bare-stopped": "bare forward, stopped after block {deepest}",
    "ours-methods": "ours, all four methods from one pass (batch_size={bs})",
    "steering-vectors-pca": "steering-vectors 0.12.2 pca_aggregator (batch_size={bs})",
    "repeng": "repeng 0.4.0 pca_diff (batch_size={bs})",
}
SKIP_MEAN = "steering-vectors has no mean-over-tokens mode (it reads one token index)"


@dataclass
class Workload:
    name: str
    title: str
    model: str           # key of prepared model directories
    pairs: str           # key of prepared pair files
    layers: list[int]
    token_position: str
    systems: list[str]
    skipped: dict[str, str] = field(default_factory=dict)
    group: str = "real"  # "real" | "scaling" | "gpu"


# ---------------------------------------------------------------- models and pairs

def _atomic_dir(target: Path, write) -> Path:
    """Create ``target`` through a temporary sibling, so a broken run leaves no half directory."""
    if (target / "config.json").is_file() or (target / "tokenizer_config.json").is_file():
        return target
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    write(partial)
    partial.replace(target)
    return target


def smollm2_dir() -> Path:
    """The bundled model, float32, as an ordinary HF directory (named so its config is found)."""
    def write(folder):
        from rotalabs_steer.bundled_model import load_default
        model, tokenizer = load_default()
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    return _atomic_dir(WORK / SMOLLM2, write)


def tokenizer_dir() -> Path:
    """SmolLM2's tokenizer alone (what the config-built models use; small enough to carry)."""
    def write(folder):
        from transformers import AutoTokenizer
        source = WORK / SMOLLM2
        if not (source / "tokenizer_config.json").is_file():
            from rotalabs_steer.bundled_model import load_default
            tokenizer = load_default()[1]
        else:
            tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
        tokenizer.save_pretrained(folder)
    return _atomic_dir(WORK / "smollm2-tokenizer", write)


def config_model_dir(name: str, *, hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int,
                     tie: bool, dtype: str, device: str) -> Path:
    """A Llama-architecture model built from a config (seeded random weights) + SmolLM2's tokenizer."""
    def write(folder):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir(), local_files_only=True)
        config = LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=intermediate,
            num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
            max_position_embeddings=2048, tie_word_embeddings=tie, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        )
        torch.manual_seed(0)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    return _atomic_dir(WORK / name, write)


def model_size(model_dir: Path) -> tuple[int, int]:
    """(parameters, decoder blocks) from the saved config, without loading weights."""
    from transformers import AutoConfig, AutoModelForCausalLM
    import torch

    config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters()), config.num_hidden_layers


def refusal_pairs() -> list[dict]:
    from rotalabs_steer.datasets import load_refusal_pairs
    return [{"positive": p.positive, "negative": p.negative} for p in load_refusal_pairs()]


def combined_pairs(n: int, pool: int = 0) -> list[dict]:
    """``n`` pairs made by combining the shipped datasets' user turns and reply pairs.

    Deterministic; any prefix is spread over every behaviour, so texts have the same length
    distribution at every n (time should grow linearly in n). With ``pool`` > n, the longest
    pair of the first ``pool`` takes the last place: the longest text sets the first (largest)
    batch and so the activation peak, which then does not grow with n just because a larger
    sample reaches a longer maximum; what is left of RSS growth is the extraction's own.
    """
    from rotalabs_steer.datasets import BEHAVIORS, load_behavior_pairs, render_exchange

    records = []
    for behavior in BEHAVIORS:
        for pair in load_behavior_pairs(behavior):
            user = pair.metadata["user"]
            prefix = render_exchange(user, "")
            assert pair.positive.startswith(prefix) and pair.negative.startswith(prefix)
            records.append((user, pair.positive[len(prefix):], pair.negative[len(prefix):]))
    count = len(records)
    step_reply, step_user = _coprime_step(count, 397), _coprime_step(count, 211)
    pairs = []
    for k in range(max(n, pool)):
        _, positive, negative = records[(k * step_reply) % count]
        user = records[(k * step_user + k // count) % count][0]
        pairs.append({"positive": render_exchange(user, positive), "negative": render_exchange(user, negative)})
    longest = max(range(len(pairs)), key=lambda k: max(len(pairs[k]["positive"]), len(pairs[k]["negative"])))
    chosen = pairs[:n]
    if longest >= n:
        chosen[-1] = pairs[longest]
    return chosen


def _coprime_step(count: int, start: int) -> int:
    import math
    step = start
    while math.gcd(step, count) != 1:
        step += 1
    return step


def count_tokens(model_dir: Path, pairs: list[dict]) -> int:
    """Real (unpadded) tokens in all texts, as every system tokenizes them."""
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    texts = [p["positive"] for p in pairs] + [p["negative"] for p in pairs]
    return sum(len(ids) for ids in tokenizer(texts, truncation=True, max_length=MAX_LENGTH)["input_ids"])


# ---------------------------------------------------------------- workloads

def cpu_workloads(quick: bool, n_refusal: int) -> tuple[list[Workload], dict, dict]:
    from rotalabs_steer.configs import get_model_config

    layers5 = get_model_config(SMOLLM2).get_recommended_layers("refusal")[:5]
    layer1 = [layers5[len(layers5) // 2]]
    workloads = []
    for position in ("last", "mean"):
        for layers in (layers5, layer1):
            label = f"{len(layers)} layer{'s' if len(layers) > 1 else ''}"
            systems = ["ours", "reference", "steering-vectors", "bare-full", "bare-stopped"]
            skipped = {}
            if position != "last":
                systems.remove("steering-vectors")
                skipped["steering-vectors"] = SKIP_MEAN
            workloads.append(Workload(
                f"smollm2-{len(layers)}layer{'s' if len(layers) > 1 else ''}-{position}",
                f"SmolLM2-135M-Instruct, refusal pairs, {label} {layers}, token position `{position}`",
                "smollm2", "refusal", layers, position, systems, skipped))
    scaling_model = {"name": "llama-h384-l8-config", "hidden": 384, "intermediate": 1024, "layers": 8,
                     "heads": 6, "kv_heads": 2, "tie": True}
    from rotalabs_steer.configs import ModelConfig
    scaling_layers = ModelConfig("config", scaling_model["layers"], scaling_model["hidden"]).get_recommended_layers("x")
    sizes = (4, 8, 16) if quick else (64, 256, 1024)
    for label, n in zip((64, 256, 1024), sizes):
        workloads.append(Workload(
            f"scaling-{label}", f"Llama config model (hidden 384, 8 blocks, random weights), {n} combined pairs, "
            f"layers {scaling_layers}, token position `last`",
            "scaling", f"combined-{n}", scaling_layers, "last", ["ours", "bare-stopped"],
            {"reference": "scaling runs: ours and the bare forward only",
             "steering-vectors": "scaling runs: ours and the bare forward only",
             "bare-full": "not run for scaling: on this small model the full depth is mostly the LM head "
                          "(49k-token vocabulary), ~4x the time of ours, and says nothing about scaling"},
            group="scaling"))
    models = {"smollm2": smollm2_dir, "scaling": lambda: config_model_dir(
        scaling_model["name"], hidden=384, intermediate=1024, layers=8, heads=6, kv_heads=2, tie=True,
        dtype="float32", device="cpu")}
    pairs = {"refusal": lambda: refusal_pairs()[:n_refusal or None]}
    for n in sizes:
        pairs[f"combined-{n}"] = (lambda n=n: combined_pairs(n, pool=max(sizes)))
    return workloads, models, pairs


def methods_workloads(quick: bool, n_refusal: int) -> tuple[list[Workload], dict, dict]:
    """Every estimator from one pass against the peers' one method per pass, then scaling."""
    from rotalabs_steer.configs import ModelConfig, get_model_config

    layers5 = get_model_config(SMOLLM2).get_recommended_layers("refusal")[:5]
    workloads = [Workload(
        "methods-smollm2-5layers-last", f"SmolLM2-135M-Instruct, refusal pairs, 5 layers {layers5}, token position "
        "`last`: caa + pca + pca_diff + fisher (ours, one pass) against one method per peer pass",
        "smollm2", "refusal", layers5, "last", ["ours-methods", "steering-vectors", "steering-vectors-pca", "repeng"],
        group="methods")]
    scaling_layers = ModelConfig("config", 8, 384).get_recommended_layers("x")
    sizes = (4, 8, 16) if quick else (64, 256, 1024)
    for label, n in zip((64, 256, 1024), sizes):
        workloads.append(Workload(
            f"methods-scaling-{label}", f"Llama config model (hidden 384, 8 blocks, random weights), {n} combined "
            f"pairs, layers {scaling_layers}, token position `last`, all four methods",
            "scaling", f"combined-{n}", scaling_layers, "last", ["ours-methods"], group="methods-scaling"))
    models = {"smollm2": smollm2_dir, "scaling": lambda: config_model_dir(
        "llama-h384-l8-config", hidden=384, intermediate=1024, layers=8, heads=6, kv_heads=2, tie=True,
        dtype="float32", device="cpu")}
    pairs = {"refusal": lambda: refusal_pairs()[:n_refusal or None]}
    for n in sizes:
        pairs[f"combined-{n}"] = (lambda n=n: combined_pairs(n, pool=max(sizes)))
    return workloads, models, pairs


def method_cosines(rows: dict, runs_dir: Path) -> None:
    """Cosine (min over layers) between each peer's vectors and ours-methods' of the same method."""
    import numpy as np

    ours = rows.get("ours-methods", {})
    if not ours.get("methods"):
        return
    for system, method in PEER_METHOD.items():
        theirs = rows.get(system, {}).get("_vectors")
        if theirs is None:
            continue
        mine = np.load(runs_dir / "ours-methods" / f"vectors_{method}.npy")
        cosines = [float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b))) for a, b in zip(mine, theirs)]
        # Signs are conventions (ours: u . mean(d) > 0; repeng: a majority vote over pairs),
        # so |cosine| compares the directions themselves.
        rows[system]["cosine_vs_ours"] = {"method": method, "min": min(cosines),
                                          "min_abs": min(abs(c) for c in cosines), "per_layer": cosines}


GPU_MODEL = {"name": "llama-1.2b-config-bf16", "hidden": 2048, "intermediate": 5632, "layers": 22,
             "heads": 32, "kv_heads": 4, "tie": False}


def gpu_workloads(quick: bool, n_refusal: int, device: str, dtype: str) -> tuple[list[Workload], dict, dict]:
    from rotalabs_steer.configs import ModelConfig

    g = GPU_MODEL
    recommended = ModelConfig("config", g["layers"], g["hidden"]).get_recommended_layers("x")
    layers5 = recommended[:5]
    layer1 = [layers5[len(layers5) // 2]]
    skipped = {"reference": "GPU section: ours and the bare forward only",
               "steering-vectors": "GPU section: ours and the bare forward only"}
    systems = ["ours", "bare-full", "bare-stopped"]
    n_big = 16 if quick else 1024
    model = f"Llama config model (hidden {g['hidden']}, {g['layers']} blocks, random weights, {dtype})"

    def label(layers):
        return f"{len(layers)} layer{'s' if len(layers) > 1 else ''} {layers}"

    workloads = [
        Workload(f"gpu-{len(layers)}layer{'s' if len(layers) > 1 else ''}-{position}",
                 f"{model}, refusal pairs, {label(layers)}, token position `{position}`",
                 "gpu", "refusal", layers, position, systems, skipped, "gpu")
        for layers, position in ((layers5, "last"), (layer1, "last"), (layers5, "mean"))
    ]
    workloads.append(Workload(f"gpu-1024pairs-{len(layers5)}layers-last",
                              f"{model}, {n_big} combined pairs, {label(layers5)}, token position `last`",
                              "gpu", f"combined-{n_big}", layers5, "last", systems, skipped, "gpu"))
    models = {"gpu": lambda: config_model_dir(
        g["name"], hidden=g["hidden"], intermediate=g["intermediate"], layers=g["layers"], heads=g["heads"],
        kv_heads=g["kv_heads"], tie=g["tie"], dtype=dtype, device=device)}
    pairs = {"refusal": lambda: refusal_pairs()[:n_refusal or None],
             f"combined-{n_big}": lambda: combined_pairs(n_big)}
    return workloads, models, pairs


# ---------------------------------------------------------------- running

def system_python(system: str) -> Path:
    venv = SYSTEMS[system][0]
    if venv == "ours":
        return Path(sys.executable)
    python = VENVS / venv / "bin" / "python"
    if not python.is_file():
        raise SystemExit(f"{python} is missing: run bench/setup_peers.sh (or `make bench-peers`) first")
    return python


def run_driver(system: str, job: dict, log) -> dict:
    """Run one system's driver on ``job`` in a fresh process; its result.json, or an error entry."""
    out = Path(job["out_dir"])
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    job_file = out / "job.json"
    job_file.write_text(json.dumps(job, indent=2))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    threads = str(job["threads"])
    env.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads, OPENBLAS_NUM_THREADS=threads,
               TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               PYTHONUNBUFFERED="1", PYTHONDONTWRITEBYTECODE="1")
    if SYSTEMS[system][0] == "ours":
        env["PYTHONPATH"] = str(REPO)
    command = [str(system_python(system)), str(DRIVERS / SYSTEMS[system][1]), str(job_file)]
    start = time.perf_counter()
    proc = subprocess.run(command, cwd=WORK, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    elapsed = time.perf_counter() - start
    (out / "driver.log").write_text(proc.stdout)
    if proc.returncode != 0 or not (out / "result.json").is_file():
        tail = "\n".join(proc.stdout.strip().splitlines()[-15:])
        log(f"    FAILED ({proc.returncode}):\n{tail}")
        return {"system": system, "error": f"driver exited {proc.returncode}: {tail.splitlines()[-1] if tail else ''}",
                "process_s": elapsed}
    result = json.loads((out / "result.json").read_text())
    result["process_s"] = elapsed
    result["median_s"] = statistics.median(result["times_s"])
    return result


def rel_l2(ours, other) -> float:
    import numpy as np
    ours, other = np.asarray(ours, dtype=np.float64), np.asarray(other, dtype=np.float64)
    return float(max(np.linalg.norm(ours[i] - other[i]) / np.linalg.norm(other[i]) for i in range(len(other))))


def run_workload(w: Workload, model_dir: Path, pairs_file: Path, n_pairs: int, tokens: int, args, runs_dir,
                 shared: dict, log) -> dict:
    import numpy as np

    log(f"\n== {w.name}: {w.title}")
    rows = {}
    for system in w.systems:
        key = None
        if system.startswith("bare"):
            # A bare forward depends on the batches and how deep it runs, not on the position:
            # measured once per (model, pairs, depth) and shared by the workloads that match.
            key = (system, str(model_dir), str(pairs_file), max(w.layers) if system == "bare-stopped" else None)
            if key in shared:
                rows[system] = dict(shared[key][1], shared_with=shared[key][0])
                log(f"  {system:>17}: median {rows[system]['median_s']:.3f} s (measured in {shared[key][0]})")
                continue
        job = {
            "system": system, "model_dir": str(model_dir), "pairs_file": str(pairs_file), "behavior": "refusal"
            if w.pairs == "refusal" else "combined", "layers": w.layers, "token_position": w.token_position,
            "batch_size": args.batch_size, "repeats": args.repeats, "threads": args.threads,
            "device": args.device, "dtype": args.dtype, "out_dir": str(runs_dir / w.name / system),
        }
        result = run_driver(system, job, log)
        if "error" not in result:
            if result.get("vectors"):
                result["_vectors"] = np.load(Path(job["out_dir"]) / result["vectors"])
            result["tokens_per_s"] = tokens / result["median_s"]
            if key is not None:
                shared[key] = (w.name, result)
        rows[system] = result

    method_cosines(rows, runs_dir / w.name)
    if "ours-methods" in rows and "ours" not in rows:  # peers' times against our one pass
        rows = {"ours": rows.pop("ours-methods"), **rows}
        rows["ours"]["system"] = "ours-methods"
    ours = rows.get("ours", {}).get("_vectors")
    for system, row in rows.items():
        if system != "ours" and row.get("_vectors") is not None and ours is not None:
            row["rel_l2_vs_ours"] = rel_l2(ours, row["_vectors"])
    ours_t = rows.get("ours", {}).get("median_s")
    for system, row in rows.items():
        if "median_s" in row and ours_t:
            row["ratio_to_ours"] = row["median_s"] / ours_t
        if "error" in row:
            continue
        extra = f"  rel.L2 vs ours {row['rel_l2_vs_ours']:.1e}" if "rel_l2_vs_ours" in row else ""
        if "cosine_vs_ours" in row:
            cosine = row["cosine_vs_ours"]
            extra = f"  cosine vs ours' {cosine['method']}: min {cosine['min']:.6f}, min |.| {cosine['min_abs']:.6f}"
        ratio = f"  ({row['ratio_to_ours']:.2f}x ours)" if "ratio_to_ours" in row and system != "ours" else ""
        if "shared_with" not in row:
            log(f"  {system:>17}: median {row['median_s']:.3f} s{ratio}  peak RSS {row['peak_rss_kib'] / 1024:.0f} MiB"
                f"  {row['tokens_per_s']:.0f} tok/s{extra}")
    clean = {s: {k: v for k, v in r.items() if not k.startswith("_")} for s, r in rows.items()}
    for system, reason in w.skipped.items():
        clean.setdefault(system, {"system": system, "skipped": reason})
    return {
        "title": w.title, "group": w.group, "model": w.model, "model_dir": model_dir.relative_to(REPO).as_posix()
        if model_dir.is_relative_to(REPO) else str(model_dir), "pairs": n_pairs, "texts": 2 * n_pairs,
        "tokens": tokens, "layers": w.layers, "token_position": w.token_position, "batch_size": args.batch_size,
        "repeats": args.repeats, "date": datetime.now().isoformat(timespec="seconds"), "command": args.command,
        "rows": clean,
    }


def machine_meta(args) -> dict:
    import torch
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    meta = {
        "date": date.today().isoformat(), "cpu": cpu, "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "threads": args.threads, "python": platform.python_version(), "torch": torch.__version__,
        "transformers": transformers.__version__, "device": args.device, "dtype": args.dtype,
        "batch_size": args.batch_size, "repeats": args.repeats, "command": args.command,
        "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }
    if args.device.startswith("cuda"):
        meta["gpu"] = torch.cuda.get_device_name(0)
    meta["commit"] = git_commit()
    return meta


def git_commit() -> str | None:
    """HEAD of the checkout, '+dirty' when the package has uncommitted changes (None without git)."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "rotalabs_steer", "csrc"], cwd=REPO,
                               capture_output=True, text=True, check=True).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per system (median reported); >= 3 for RESULTS.md")
    parser.add_argument("--quick", action="store_true", help="smoke run: 4 pairs (scaling: 4/8/16), 1 repeat, "
                        "results under bench/.work/quick/")
    parser.add_argument("--only", default="", help="comma-separated workload names or prefixes (e.g. smollm2-5layers, scaling)")
    parser.add_argument("--systems", default="", help="comma-separated systems to run (default: all of each workload)")
    parser.add_argument("--pairs", type=int, default=0, help="use only the first N refusal pairs (default: all 77; "
                        "--quick: 4); like --quick, writes under bench/.work/quick/")
    parser.add_argument("--batch-size", type=int, default=16, help="texts per forward for ours, steering-vectors and the bare forwards")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads in every system (default: all cores)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--gpu-model", action="store_true", help="the GPU section: a ~1.2B-parameter Llama config model, "
                        "ours and the bare forwards only (use with --device cuda --dtype bfloat16)")
    parser.add_argument("--results-dir", type=Path, help="where section JSON goes (default bench/results, quick: bench/.work/quick/results)")
    parser.add_argument("--methods", action="store_true", help="the estimator section (bench/results/methods.json): "
                        "ours' four methods from one pass against steering-vectors' mean and pca and repeng's pca_diff")
    parser.add_argument("--render-only", action="store_true", help="only re-render RESULTS.md and results.png from the JSON")
    args = parser.parse_args()
    args.command = " ".join(["python", "bench/run_bench.py", *map(shlex.quote, sys.argv[1:])])
    if args.quick:
        args.repeats = 1 if "--repeats" not in sys.argv else args.repeats
    trial = args.quick or args.pairs  # not the full workloads: keep away from the committed results
    results_dir = args.results_dir or (WORK / "quick" / "results" if trial else BENCH / "results")
    out_dir = results_dir.parent  # RESULTS.md and results.png go beside the JSON folder

    import report

    if args.render_only:
        report.render(results_dir, out_dir / "RESULTS.md", out_dir / "results.png")
        return
    if not args.quick and args.repeats < 3:
        print(f"note: --repeats {args.repeats} < 3; the issue asks for >= 3", file=sys.stderr)

    WORK.mkdir(parents=True, exist_ok=True)
    cuda = args.device.startswith("cuda")
    section = ("gpu" if cuda else "cpu-gpu-model") if args.gpu_model else ("gpu-small" if cuda else "cpu")
    if args.methods:
        section = "methods" if not cuda else "methods-gpu"
    n_refusal = args.pairs or (4 if args.quick else 0)
    if args.methods:
        workloads, models, pair_sets = methods_workloads(args.quick, n_refusal)
    elif args.gpu_model:
        workloads, models, pair_sets = gpu_workloads(args.quick, n_refusal, args.device, args.dtype)
    else:
        workloads, models, pair_sets = cpu_workloads(args.quick, n_refusal)
    order = [w.name for w in workloads]
    only = [s for s in args.only.split(",") if s]
    if only:
        workloads = [w for w in workloads if any(w.name == o or w.name.startswith(o) for o in only)]
        if not workloads:
            parser.error(f"--only {args.only!r} matches no workload")
    systems = [s for s in args.systems.split(",") if s]
    for w in workloads:
        if systems:
            w.systems = [s for s in w.systems if s in systems]

    def log(message):
        print(message, flush=True)

    started = time.perf_counter()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    if load > 0.5 and args.device == "cpu" and not args.quick:
        log(f"warning: load average {load:.2f} before the run: other processes share the cores, and "
            "timings with every core in use will be noisy (run on a quiet machine)")
    log(f"extraction benchmark: section {section}, {len(workloads)} workloads, {args.repeats} repeat(s), "
        f"{args.threads} threads, {args.device}/{args.dtype}")
    model_dirs, pair_files, token_counts, sizes = {}, {}, {}, {}
    runs_dir = (WORK / "quick" if trial else WORK) / "runs" / section
    shared: dict = {}
    results_file = results_dir / f"{section}.json"
    previous = json.loads(results_file.read_text()) if results_file.is_file() and only else {}
    done = dict(previous.get("workloads", {}))
    for w in workloads:
        if w.model not in model_dirs:
            log(f"preparing model '{w.model}' ...")
            model_dirs[w.model] = models[w.model]()
        if w.pairs not in pair_files:
            pairs = pair_sets[w.pairs]()
            path = WORK / ("quick" if trial else "") / "pairs" / f"{w.pairs}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(pairs, ensure_ascii=False))
            pair_files[w.pairs] = (path, len(pairs))
        key = (w.model, w.pairs)
        if key not in token_counts:
            token_counts[key] = count_tokens(model_dirs[w.model], json.loads(pair_files[w.pairs][0].read_text()))
        path, n_pairs = pair_files[w.pairs]
        done[w.name] = run_workload(w, model_dirs[w.model], path, n_pairs, token_counts[key], args, runs_dir, shared, log)
        if w.model not in sizes:
            sizes[w.model] = dict(zip(("parameters", "blocks"), model_size(model_dirs[w.model])))
        results_dir.mkdir(parents=True, exist_ok=True)
        meta = machine_meta(args)
        meta["models"] = {**previous.get("meta", {}).get("models", {}), **sizes}
        ordered = {n: done[n] for n in order if n in done} | {n: v for n, v in done.items() if n not in order}
        results_file.write_text(json.dumps({"section": section, "meta": meta, "workloads": ordered}, indent=2) + "\n")
        report.render(results_dir, out_dir / "RESULTS.md", out_dir / "results.png")  # after each workload
    log(f"\nwrote {results_file}, {out_dir / 'RESULTS.md'}, {out_dir / 'results.png'} "
        f"({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
