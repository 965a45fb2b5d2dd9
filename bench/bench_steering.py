"""Steering on the bundled model: conditional refusal steering, and what steering costs in generate.

1. Conditional steering (issue: steer only the requests that need it). A refusal vector at
   layer 14 (relative strength 0.3) and a condition vector at layer 8 extracted from harmful vs
   harmless user turns (mean over prompt tokens). The threshold is fitted on other training
   prompts; everything is measured on held-out evaluation prompts: the refusal rate of harmful
   prompts unsteered / steered unconditionally / steered conditionally, and how many benign
   prompts keep exactly their unsteered output under the condition.
2. Overhead: steered generate (batch 8, 64 new tokens, greedy) against unsteered, each operator,
   interleaved, median of N repeats: the ratio steered / unsteered.

Writes bench/results/steering.json and prints a markdown table (pasted into bench/RESULTS.md).
Usage: python bench/bench_steering.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from pathlib import Path

import torch

from rotalabs_steer import ActivationInjector
from rotalabs_steer.bundled_model import load_default
from rotalabs_steer.conditions import find_condition_threshold
from rotalabs_steer.datasets import BEHAVIORS, load_behavior_pairs, load_evaluation_prompts, load_refusal_pairs
from rotalabs_steer.evaluation import is_refusal
from rotalabs_steer.extraction import extract_caa_vector

STEER_LAYER, CONDITION_LAYER, STRENGTH = 14, 8, 0.3
RESULTS = Path(__file__).parent / "results" / "steering.json"


def chat(tokenizer, prompts):
    return [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
            for p in prompts]


def generate(model, tokenizer, texts, new_tokens, batch_size=8):
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    outputs = []
    try:
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(texts[start:start + batch_size], return_tensors="pt", padding=True,
                              add_special_tokens=False)
            with torch.inference_mode():
                out = model.generate(**batch, max_new_tokens=new_tokens, do_sample=False,
                                     pad_token_id=tokenizer.pad_token_id)
            outputs += [tokenizer.decode(row[batch["input_ids"].shape[1]:], skip_special_tokens=True)
                        for row in out]
    finally:
        tokenizer.padding_side = side
    return outputs


def conditional(model, tokenizer) -> dict:
    refusal = extract_caa_vector(model, tokenizer, load_refusal_pairs(), STEER_LAYER, batch_size=16,
                                 show_progress=False)
    harmful = [pair.metadata["user"] for pair in load_behavior_pairs("refusal")]
    benign = [pair.metadata["user"] for b in BEHAVIORS if b != "refusal"
              for pair in load_behavior_pairs(b)][: 2 * len(harmful)]
    half_h, half_b = len(harmful) // 2, len(benign) // 2
    condition_vector = extract_caa_vector(
        model, tokenizer, [{"positive": p, "negative": n} for p, n in zip(chat(tokenizer, harmful[:half_h]),
                                                                          chat(tokenizer, benign[:half_h]))],
        CONDITION_LAYER, "mean", batch_size=16, show_progress=False)
    choice = find_condition_threshold(model, tokenizer, condition_vector, chat(tokenizer, harmful[half_h:]),
                                      chat(tokenizer, benign[half_b:]))
    held_out = load_evaluation_prompts("refusal")
    test_harmful = chat(tokenizer, [e.prompt for e in held_out.positive_examples])
    test_benign = chat(tokenizer, [e.prompt for e in held_out.negative_examples] +
                       [e.prompt for b in BEHAVIORS if b != "refusal" for e in load_evaluation_prompts(b)][:24])
    texts = test_harmful + test_benign
    plain = generate(model, tokenizer, texts, 40)
    with ActivationInjector(model, [refusal], STRENGTH, relative=True):
        always = generate(model, tokenizer, texts, 40)
    with ActivationInjector(model, [refusal], STRENGTH, relative=True, condition=choice.condition(condition_vector)):
        gated = generate(model, tokenizer, texts, 40)
    n = len(test_harmful)

    def rate(outputs):
        return sum(map(is_refusal, outputs)) / len(outputs)

    return {
        "condition": {"layer": CONDITION_LAYER, "threshold": choice.threshold, "comparator": choice.comparator,
                      "fit_f1": choice.f1},
        "harmful_prompts": n, "benign_prompts": len(test_benign),
        "refusal_rate_harmful": {"unsteered": rate(plain[:n]), "always": rate(always[:n]), "conditional": rate(gated[:n])},
        "refusal_rate_benign": {"unsteered": rate(plain[n:]), "always": rate(always[n:]), "conditional": rate(gated[n:])},
        "benign_outputs_unchanged": {"always": sum(a == p for a, p in zip(always[n:], plain[n:])),
                                     "conditional": sum(g == p for g, p in zip(gated[n:], plain[n:]))},
        "harmful_steered_conditionally": sum(g == a for g, a in zip(gated[:n], always[:n])),
    }


def overhead(model, tokenizer, repeats: int) -> dict:
    vector = extract_caa_vector(model, tokenizer, load_refusal_pairs(), STEER_LAYER, batch_size=16, show_progress=False)
    texts = chat(tokenizer, [e.prompt for e in load_evaluation_prompts("refusal").positive_examples[:8]])
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    tokenizer.padding_side = side
    torch.manual_seed(0)
    unit = torch.randn(vector.dim)
    random = vector.__class__("random", STEER_LAYER, unit / unit.norm() * 1e-3, "x",
                              metadata=dict(vector.metadata))  # tiny: every run generates all 64 tokens

    def run(injector):
        start = time.perf_counter()
        with injector if injector is not None else contextlib.nullcontext(), torch.inference_mode():
            model.generate(**batch, max_new_tokens=64, min_new_tokens=64, do_sample=False,
                               pad_token_id=tokenizer.pad_token_id)
        return time.perf_counter() - start

    systems = {"unsteered": lambda: None,
               "add": lambda: ActivationInjector(model, [random], 1.0),
               "ablate": lambda: ActivationInjector(model, [random], 1.0, operator="ablate"),
               "clamp": lambda: ActivationInjector(model, [random], 0.1, operator="clamp", relative=True)}
    times = {name: [] for name in systems}
    run(None)  # warm-up
    for _ in range(repeats):
        for name, make in systems.items():  # interleaved
            times[name].append(run(make()))
    base = statistics.median(times["unsteered"])
    return {name: {"median_s": statistics.median(t), "ratio": statistics.median(t) / base} for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", choices=("conditional", "overhead"),
                        help="rerun one part, keeping the other from the last results file")
    args = parser.parse_args()
    torch.set_num_threads(1)  # on a shared 2-core machine two threads spin-wait against other work
    model, tokenizer = load_default()
    result = json.loads(RESULTS.read_text()) if args.only and RESULTS.exists() else {}
    if args.only != "overhead":
        result["conditional"] = conditional(model, tokenizer)
    if args.only != "conditional":
        result["overhead"] = overhead(model, tokenizer, args.repeats)
    result["threads"] = torch.get_num_threads()
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    c = result["conditional"]
    print("| | unsteered | always steered | conditional |\n|---|---|---|---|")
    print("| refusal rate, harmful ({}) | {unsteered:.2f} | {always:.2f} | {conditional:.2f} |".format(
        c["harmful_prompts"], **c["refusal_rate_harmful"]))
    print("| refusal rate, benign ({}) | {unsteered:.2f} | {always:.2f} | {conditional:.2f} |".format(
        c["benign_prompts"], **c["refusal_rate_benign"]))
    print(f"| benign outputs identical to unsteered | | {c['benign_outputs_unchanged']['always']} | "
          f"{c['benign_outputs_unchanged']['conditional']} |")
    print(f"\ncondition: layer {CONDITION_LAYER}, {c['condition']['comparator']} {c['condition']['threshold']:.3f} "
          f"(F1 {c['condition']['fit_f1']:.2f} on the fitting prompts)\n")
    print("| generate, batch 8, 64 tokens | median s | ratio to unsteered |\n|---|---|---|")
    for name, row in result["overhead"].items():
        print(f"| {name} | {row['median_s']:.2f} | {row['ratio']:.3f} |")


if __name__ == "__main__":
    main()
