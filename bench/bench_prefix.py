"""Shared-prefix benchmark (issue 16): ours vs the bare forward stopped after the deepest block,
and vs rotalabs-steer 1.2.0, on A/B items and on chat-template refusal pairs, 5 layers.

Reuses run_bench.py's model directory, drivers and runner (bench/peers/*): each system runs in
its own process; systems are interleaved round by round, and every ratio is taken within one
round (the machine is shared and noisy); the spread over rounds is printed with them.

  python bench/bench_prefix.py [--rounds 2] [--ab-items 200] [--batch-size 16] [--append]

The reference's venv: bench/.venvs/reference, or the folder holding the peers' venvs in
$ROTALABS_BENCH_VENVS. --append adds the table to bench/RESULTS.md under its own heading.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run_bench  # noqa: E402  (its models, drivers and runner)

if os.environ.get("ROTALABS_BENCH_VENVS"):
    run_bench.VENVS = Path(os.environ["ROTALABS_BENCH_VENVS"])

SYSTEMS = ("ours", "bare-stopped", "reference")


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


def shared_fraction(tokenizer, pairs) -> float:
    """Share of all tokens that lie in a pair's common prefix and are run once instead of twice."""
    from rotalabs_steer.extraction.shared_prefix import common_prefix_length

    total = saved = 0
    for pair in pairs:
        a, b = (tokenizer(pair[s], truncation=True, max_length=512)["input_ids"] for s in ("positive", "negative"))
        total += len(a) + len(b)
        saved += common_prefix_length(a, b)
    return saved / total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--ab-items", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--sample", type=Path, default=None, help="CAA A/B JSON sample (optional workload)")
    parser.add_argument("--skip-reference", action="store_true")
    parser.add_argument("--only", nargs="*", default=None, help="workload names to run (default: all)")
    parser.add_argument("--append", action="store_true", help="append the table to bench/RESULTS.md")
    args = parser.parse_args()

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
        rows.append({"workload": name, "pairs": len(pairs), "shared": shared_fraction(tokenizer, pairs),
                     "rounds": per_round, "ours_over_bare": ratio_bare, "reference_over_ours": ratio_ref})

    lines = [f"## Shared prefixes (issue 16): SmolLM2-135M-Instruct, CPU, {args.threads} thread(s), "
             f"layers {layers}, `last`, batch_size={args.batch_size}",
             "",
             f"`python bench/bench_prefix.py --rounds {args.rounds} --ab-items {args.ab_items}`; each round "
             "runs the systems one after the other in fresh processes; ratios are within one round, "
             "first round and [min, max] over rounds.",
             "",
             "| workload | pairs | prefix tokens run once | ours s | ours / bare-stopped | reference / ours |",
             "|---|---|---|---|---|---|"]
    for row in rows:
        def cell(values, fmt="{:.2f}"):
            if not values:
                return "not run"
            return f"{fmt.format(values[0])} [{fmt.format(min(values))}, {fmt.format(max(values))}]"
        lines.append(f"| {row['workload']} | {row['pairs']} | {row['shared']:.0%} | "
                     f"{statistics.median(r['ours'] for r in row['rounds']):.2f} | "
                     f"{cell(row['ours_over_bare'])}× | {cell(row['reference_over_ours'], '{:.1f}')}× |")
    table = "\n".join(lines) + "\n"
    print(table)
    (runs / "results.json").write_text(json.dumps(rows, indent=2))
    if args.append:
        with open(run_bench.BENCH / "RESULTS.md", "a") as f:
            f.write("\n" + table)


if __name__ == "__main__":
    main()
