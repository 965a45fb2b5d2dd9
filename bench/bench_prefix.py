"""Shared-prefix benchmark (issue 16): ours vs the bare forward stopped after the deepest block,
and vs rotalabs-steer 1.2.0, on A/B items and on chat-template refusal pairs, 5 layers.

Reuses run_bench.py's model directory, drivers and runner (bench/peers/*): each system runs in
its own process; systems are interleaved round by round, and every ratio is taken within one
round (the machine is shared and noisy); the spread over rounds is printed with them.

  python bench/bench_prefix.py [--rounds 2] [--ab-items 200] [--batch-size 16] [--write-results]

The reference's venv: bench/.venvs/reference, or the folder holding the peers' venvs in
$ROTALABS_BENCH_VENVS. --write-results writes bench/results/prefix.json and replaces this
script's section of bench/RESULTS.md (report.replace_section).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import report  # noqa: E402
import run_bench  # noqa: E402  (its models, drivers and runner)

if os.environ.get("ROTALABS_BENCH_VENVS"):
    run_bench.VENVS = Path(os.environ["ROTALABS_BENCH_VENVS"])

SYSTEMS = ("ours", "bare-stopped", "reference")
HEADING = "## Shared prefixes (issue 16)"
RESULTS_JSON = run_bench.BENCH / "results" / "prefix.json"


def ab_records(n: int) -> list[dict]:
    """``n`` CAA-style A/B items made from the shipped refusal pairs: the user turn as the
    question, the start of both replies as the choices (order alternating), the refusal as
    the matching answer."""
    from rotalabs_steer.datasets import load_refusal_pairs

    pool = list(load_refusal_pairs())
    records = []
    for i in range(n):
        pair = pool[i % len(pool)]
        question, _, refusal = pair.positive.partition("\nAssistant: ")
        other = pair.negative.partition("\nAssistant: ")[2]
        question = question.removeprefix("User: ")
        # CAA's choices are about a sentence long; items repeat the pool with a varied stem.
        refusal, other = refusal[:100].rstrip(), other[:100].rstrip()
        first, second = (refusal, other) if i % 2 == 0 else (other, refusal)
        yes, no = ("(A)", "(B)") if i % 2 == 0 else ("(B)", "(A)")
        stem = ("", "Please answer: ", "Question: ", "Consider this. ")[(i // len(pool)) % 4]
        records.append({"question": f"{stem}{question}\n\nChoices:\n(A) {first}\n(B) {second}",
                        "answer_matching_behavior": yes, "answer_not_matching_behavior": no})
    return records


def workloads(n_ab: int, sample: Path | None, tokenizer) -> dict[str, list[dict]]:
    from rotalabs_steer.datasets import load_caa_ab, load_refusal_pairs

    def as_dicts(dataset):
        return [{"positive": p.positive, "negative": p.negative} for p in dataset]

    result = {}
    if sample is not None and sample.is_file():
        result["ab-sample"] = as_dicts(load_caa_ab(str(sample)))
    result[f"ab-generated-{n_ab}"] = as_dicts(load_caa_ab(ab_records(n_ab)))
    result["refusal-chat"] = as_dicts(load_refusal_pairs(tokenizer=tokenizer))
    return result


def tokens_not_run(tokenizer, pairs) -> float:
    """Share of all tokens the shared path does not run, planned as extraction plans it (each
    pair's prefix once, the stem every pair begins with once for the pass)."""
    from rotalabs_steer.extraction.shared_prefix import MIN_SHARED_TOKENS, plan_pairs, stem_length, tokens_saved

    texts = [p["positive"] for p in pairs] + [p["negative"] for p in pairs]
    ids = [tokenizer(t, truncation=True, max_length=512)["input_ids"] for t in texts]
    shared, _ = plan_pairs(ids, range(len(ids)), len(pairs), "last", None, MIN_SHARED_TOKENS)
    stem = stem_length(ids, shared, MIN_SHARED_TOKENS)
    return tokens_saved(ids, shared, len(pairs), stem) / sum(map(len, ids))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--ab-items", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--sample", type=Path, default=None, help="CAA A/B JSON sample (optional workload)")
    parser.add_argument("--skip-reference", action="store_true")
    parser.add_argument("--only", nargs="*", default=None, help="workload names to run (default: all)")
    parser.add_argument("--write-results", action="store_true",
                        help="write bench/results/prefix.json and replace the section in bench/RESULTS.md")
    args = parser.parse_args()
    if args.write_results and (args.only is not None or args.skip_reference):
        parser.error("--write-results replaces the committed results: run every workload and system")

    from transformers import AutoTokenizer

    from rotalabs_steer.configs import get_model_config

    model_dir = run_bench.smollm2_dir()
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    layers = get_model_config(run_bench.SMOLLM2).get_recommended_layers("refusal")[:5]
    runs = run_bench.WORK / "prefix"
    runs.mkdir(parents=True, exist_ok=True)
    systems = [s for s in SYSTEMS if not (args.skip_reference and s == "reference")]
    rows = []
    for name, pairs in workloads(args.ab_items, args.sample, tokenizer).items():
        if args.only is not None and name not in args.only:
            continue
        pairs_file = runs / f"{name}.json"
        pairs_file.write_text(json.dumps(pairs))
        per_round = []
        for round_ in range(args.rounds):
            times = {}
            for system in systems:
                job = {"system": system, "model_dir": str(model_dir), "pairs_file": str(pairs_file),
                       "behavior": "refusal", "layers": layers, "token_position": "last",
                       "batch_size": args.batch_size, "repeats": 1, "threads": args.threads,
                       "device": "cpu", "dtype": "float32", "out_dir": str(runs / name / system)}
                result = run_bench.run_driver(system, job, lambda m: print(m, file=sys.stderr))
                times[system] = result.get("median_s", float("nan"))
                print(f"{name} round {round_}: {system} {times[system]:.2f} s", file=sys.stderr, flush=True)
            per_round.append(times)
        ratio_bare = [t["ours"] / t["bare-stopped"] for t in per_round]
        ratio_ref = [t["reference"] / t["ours"] for t in per_round] if "reference" in systems else []
        ref_bare = [t["reference"] / t["bare-stopped"] for t in per_round] if "reference" in systems else []
        rows.append({"workload": name, "pairs": len(pairs), "not_run": tokens_not_run(tokenizer, pairs),
                     "rounds": per_round, "ours_over_bare": ratio_bare, "reference_over_ours": ratio_ref,
                     "reference_over_bare": ref_bare})

    meta = {"date": date.today().isoformat(), "commit": run_bench.git_commit(), "threads": args.threads,
            "batch_size": args.batch_size, "layers": layers, "rounds": args.rounds,
            "command": "python bench/bench_prefix.py " + " ".join(sys.argv[1:]),
            "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}
    table = section(rows, meta)
    print(table)
    if args.write_results:
        RESULTS_JSON.write_text(json.dumps({"meta": meta, "workloads": rows}, indent=2) + "\n")
        report.replace_section(run_bench.BENCH / "RESULTS.md", HEADING, table)


def section(rows: list[dict], meta: dict) -> str:
    """The RESULTS.md section: the table, then each target of issue 16 against what was measured."""
    def cell(values, fmt="{:.2f}"):
        if not values:
            return "not run"
        first = fmt.format(values[0])
        return first if len(values) == 1 else f"{first} [{fmt.format(min(values))}, {fmt.format(max(values))}]"

    lines = [HEADING, "",
             f"SmolLM2-135M-Instruct, CPU float32, {meta['threads']} thread(s), layers {meta['layers']}, token "
             f"position `last`, batch_size={meta['batch_size']}. `{meta['command']}` on {meta['date']} at commit "
             f"{meta['commit']}, load average {meta['load_average'] or 0:.2f} at the end. Each round runs ours, the "
             "bare forward stopped after the deepest block and rotalabs-steer 1.2.0 one after the other, each in a "
             "fresh process; ratios are taken within a round (first round, [min, max] over rounds). *Tokens not "
             "run*: the share of all tokens the shared path skips (each pair's common prefix once, the stem every "
             "pair begins with once per pass).",
             "",
             "| workload | pairs | tokens not run | ours s | bare-stopped s | reference s | ours / bare-stopped "
             "| reference / ours | reference / bare-stopped |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        median = lambda system: statistics.median(r[system] for r in row["rounds"]) if system in row["rounds"][0] else None  # noqa: E731
        seconds = [f"{median(system):.2f}" if median(system) is not None else "not run"
                   for system in ("ours", "bare-stopped", "reference")]
        lines.append(f"| {row['workload']} | {row['pairs']} | {row['not_run']:.0%} | {' | '.join(seconds)} | "
                     f"{cell(row['ours_over_bare'])}× | {cell(row['reference_over_ours'], '{:.1f}')}× | "
                     f"{cell(row['reference_over_bare'], '{:.1f}')}× |")
    lines += ["", "| target | workload | measured | status |", "|---|---|---:|---|"]
    for row in rows:
        ab = row["workload"].startswith("ab-")
        wanted = [("ours ≤ 0.6× the bare stopped forward", row["ours_over_bare"], 0.6, False)] if ab else []
        wanted.append((f"≥ {35 if ab else 25}× rotalabs-steer 1.2.0", row["reference_over_ours"], 35 if ab else 25, True))
        for what, values, bound, at_least in wanted:
            if not values:
                lines.append(f"| {what} | {row['workload']} | not run | n/a |")
                continue
            met = values[0] >= bound if at_least else values[0] <= bound
            extra = ""
            if at_least and row["reference_over_bare"]:
                # reference/ours = (reference/bare) / (ours/bare): the ours/bare the target needs
                extra = (f" (needs ours / bare ≤ {row['reference_over_bare'][0] / bound:.2f}; running only the "
                         f"tokens not skipped is {1 - row['not_run']:.2f})")
            lines.append(f"| {what} | {row['workload']} | {values[0]:.2f}×{extra} | {'met' if met else 'missed'} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
