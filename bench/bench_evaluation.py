"""The reference's ``strength_sweep`` against ours on the bundled model: same rates, how much faster.

    python bench/bench_evaluation.py [--prompts 8] [--strengths 0,2,4] [--max-new-tokens 32]
                                     [--repeat 2] [--threads 1] [--write-results]

Both packages run the same script (``evaluation_driver.py``) in fresh processes on the same
saved model, refusal vector (ours, layer 14), harmful prompts (the shipped refusal evaluation
set) and strengths, interleaved, ``--repeat`` times each. The reference generates one prompt
at a time, ours all prompts of a strength in one left-padded batch. Printed and written to
``bench/results/evaluation.json`` (``--write-results`` also rewrites this script's section of
``bench/RESULTS.md``): the rates of both, whether every response text is the same, and the
speed-up (median reference time / median ours). The reference's interpreter is
``$ROTALABS_REFERENCE_PYTHON`` or ``bench/.venvs/reference/bin/python`` (``make bench-peers``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
import report  # noqa: E402

REPO = BENCH.parent
DRIVER = BENCH / "evaluation_driver.py"
RESULTS_MD = BENCH / "RESULTS.md"
SECTION = "## Evaluation: `strength_sweep`, reference vs ours"
LAYER = 14


def reference_python() -> Path:
    python = Path(os.environ.get("ROTALABS_REFERENCE_PYTHON") or BENCH / ".venvs" / "reference" / "bin" / "python")
    if not python.is_file():
        raise SystemExit(f"{python} is missing: run `make bench-peers` or set ROTALABS_REFERENCE_PYTHON")
    return python


def prepare(work: Path, args) -> dict:
    """Save the bundled model and our refusal vector where both drivers can load them; the job."""
    sys.path.insert(0, str(REPO))
    import torch

    torch.set_num_threads(args.threads)
    from rotalabs_steer.bundled_model import load_default
    from rotalabs_steer.datasets import load_evaluation_prompts, load_refusal_pairs
    from rotalabs_steer.extraction import extract_caa_vector

    model, tokenizer = load_default()
    model.save_pretrained(work / "model")
    tokenizer.save_pretrained(work / "model")
    vector = extract_caa_vector(model, tokenizer, load_refusal_pairs(), LAYER, show_progress=False)
    torch.save({"vector": vector.vector, "layer": LAYER, "behavior": "refusal"}, work / "vector.pt")
    harmful = [e.prompt for e in load_evaluation_prompts("refusal").positive_examples][:args.prompts]
    return {"model_dir": str(work / "model"), "vector_file": str(work / "vector.pt"), "prompts": harmful,
            "strengths": args.strengths, "threads": args.threads, "max_new_tokens": args.max_new_tokens,
            "vector_norm": vector.norm}


def run(system: str, job_file: Path, work: Path, threads: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONDONTWRITEBYTECODE="1")
    python = sys.executable
    if system == "ours":
        env["PYTHONPATH"] = str(REPO)
    else:
        python = str(reference_python())
    out = work / f"{system}-{time.monotonic_ns()}.json"
    proc = subprocess.run([python, str(DRIVER), str(job_file), str(out)], cwd=work, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{system} driver failed ({proc.returncode}):\n{proc.stdout[-3000:]}")
    return json.loads(out.read_text())


def markdown(summary: dict) -> str:
    job = summary["job"]
    lines = [SECTION, "",
             f"Bundled SmolLM2-135M-Instruct, float32 CPU, {job['threads']} thread(s); {len(job['prompts'])} harmful "
             f"prompts of the shipped refusal evaluation set; our refusal vector at layer {LAYER} "
             f"(norm {job['vector_norm']:.2f}); greedy, at most {job['max_new_tokens']} new tokens; "
             f"`is_refusal` as the behaviour test; {summary['repeat']} interleaved runs each, fresh processes. "
             f"Command: `{summary['command']}`.", "",
             "| strength | reference behavior_rate | ours behavior_rate | same response texts |", "|---|---|---|---|"]
    for i, strength in enumerate(job["strengths"]):
        lines.append(f"| {strength:g} | {summary['reference_rates'][i]:.3f} | {summary['ours_rates'][i]:.3f} | "
                     f"{summary['same_texts_per_strength'][i]}/{len(job['prompts'])} |")
    lines += ["", f"Sweep time (median of {summary['repeat']}): reference {summary['reference_s']:.1f} s, ours "
              f"{summary['ours_s']:.1f} s: **{summary['speedup']:.2f}x** faster "
              f"(all runs: reference {summary['reference_all_s']}, ours {summary['ours_all_s']}).", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--strengths", type=lambda s: [float(x) for x in s.split(",")], default=[0.0, 2.0, 4.0])
    parser.add_argument("--max-new-tokens", type=int, default=32,
                        help="the reference's default is 150; lowered so a run takes minutes on 2 cores")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per process (1: no spin-waiting on a shared machine)")
    parser.add_argument("--write-results", action="store_true", help="also rewrite the section in RESULTS.md")
    args = parser.parse_args()
    reference_python()  # fail before the slow part
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        job = prepare(work, args)
        job_file = work / "job.json"
        job_file.write_text(json.dumps(job))
        results: dict[str, list[dict]] = {"reference": [], "ours": []}
        for i in range(args.repeat):
            for system in (("reference", "ours") if i % 2 == 0 else ("ours", "reference")):
                result = run(system, job_file, work, args.threads)
                results[system].append(result)
                print(f"run {i + 1} {system:9s} {result['seconds']:7.1f} s  rates "
                      f"{[row['behavior_rate'] for row in result['rows']]}", flush=True)
    ref, ours = results["reference"][0], results["ours"][0]
    assert "rotalabs_steer" in ref["package"] and ref["package"] != ours["package"], "both runs used one package"
    reference_times = [r["seconds"] for r in results["reference"]]
    ours_times = [r["seconds"] for r in results["ours"]]
    summary = {
        "command": "python bench/bench_evaluation.py " + " ".join(sys.argv[1:]),
        "job": {k: v for k, v in job.items() if k not in ("model_dir", "vector_file")},  # temporary paths
        "repeat": args.repeat,
        "reference_rates": [row["behavior_rate"] for row in ref["rows"]],
        "ours_rates": [row["behavior_rate"] for row in ours["rows"]],
        "same_texts_per_strength": [sum(a == b for a, b in zip(x, y))
                                    for x, y in zip(ref["responses"], ours["responses"])],
        "reference_s": statistics.median(reference_times), "ours_s": statistics.median(ours_times),
        "reference_all_s": [round(t, 1) for t in reference_times], "ours_all_s": [round(t, 1) for t in ours_times],
        "reference_rows": ref["rows"], "ours_rows": ours["rows"],
        "differing_responses": [{"strength": job["strengths"][s], "prompt": job["prompts"][p],
                                 "reference": ref["responses"][s][p], "ours": ours["responses"][s][p]}
                                for s in range(len(job["strengths"])) for p in range(len(job["prompts"]))
                                if ref["responses"][s][p] != ours["responses"][s][p]],
    }
    summary["speedup"] = summary["reference_s"] / summary["ours_s"]
    (BENCH / "results").mkdir(exist_ok=True)
    (BENCH / "results" / "evaluation.json").write_text(json.dumps(summary, indent=2))
    text = markdown(summary)
    print(text)
    if args.write_results:
        report.replace_section(RESULTS_MD, SECTION, text)


if __name__ == "__main__":
    main()
