"""Extraction speed: ours against the documented per-text, per-layer loop and a bare forward.

Run by `make bench`. Every system sees the same model, pairs and layers in one process;
each time is the median of --repeats runs, and ratios are computed from those medians.

  documented loop   for each layer, for each text: tokenize, full forward with a hook,
                    select the token (the algorithm the reference documents; batch_size ignored)
  ours              extract_caa_vectors(..., batch_size=B): one pass for all layers
  bare forward      the same right-padded, length-bucketed batches through the model with no
                    hooks: full depth, and stopped after the deepest requested block
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from datetime import date
from pathlib import Path

import torch

from rotalabs_steer import infer_model_config
from rotalabs_steer.batching import make_batches, pad_token_id, tokenize
from rotalabs_steer.capture import input_device
from rotalabs_steer.datasets import load_refusal_pairs
from rotalabs_steer.extraction import extract_caa_vectors
from rotalabs_steer.layers import find_decoder_blocks


class _Stop(Exception):
    pass


def documented_loop(model, tokenizer, pairs, layers, token_position):
    """The reference's documented algorithm, one text and one layer per forward."""
    blocks = find_decoder_blocks(model).modules
    vectors = {}
    for layer in layers:
        sides = []
        for texts in (pairs.positives, pairs.negatives):
            rows = []
            for text in texts:
                captured = {}
                handle = blocks[layer].register_forward_hook(lambda m, a, o: captured.__setitem__("h", o))
                with torch.no_grad():
                    model(**tokenizer(text, return_tensors="pt", truncation=True, max_length=512))
                handle.remove()
                hidden = captured["h"][0] if isinstance(captured["h"], tuple) else captured["h"]
                hidden = hidden[0]
                rows.append(hidden[-1] if token_position == "last" else hidden.mean(0))
            sides.append(torch.stack(rows).mean(0))
        vectors[layer] = sides[0] - sides[1]
    return vectors


def bare_forward(model, tokenizer, pairs, batch_size, stop_after=None):
    """The unavoidable compute: the same batches, no hooks (optionally cut after a block)."""
    texts = pairs.positives + pairs.negatives
    ids, _ = tokenize(tokenizer, texts, 512)
    device = input_device(model)
    handle = None
    if stop_after is not None:
        def stop(module, args, output):
            raise _Stop
        handle = find_decoder_blocks(model).modules[stop_after].register_forward_hook(stop)
    try:
        with torch.inference_mode():
            for batch in make_batches(ids, [0] * len(texts), "last", batch_size, pad_token_id(tokenizer)):
                try:
                    model(input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device),
                          use_cache=False)
                except _Stop:
                    pass
    finally:
        if handle is not None:
            handle.remove()


def timed(fn, repeats):
    times = []
    result = None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def load_model(name):
    if name == "default":
        from rotalabs_steer.models import load_default
        return load_default()
    raise SystemExit(f"unknown model {name!r}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default", help="'default' (the bundled model)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--pairs", type=int, default=0, help="use only the first N pairs (0 = all)")
    parser.add_argument("--positions", default="last,mean", help="token positions to run, comma-separated")
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("RESULTS.md"))
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())

    model, tokenizer = load_model(args.model)
    pairs = load_refusal_pairs()
    if args.pairs:
        pairs = type(pairs)(pairs.behavior, list(pairs)[: args.pairs])
    layers5 = infer_model_config(model).get_recommended_layers("refusal")[:5]
    if len(layers5) < 5:
        n = len(find_decoder_blocks(model))
        layers5 = list(range(n // 3, n // 3 + 5))
    rows = []
    for token_position in args.positions.split(","):
        for layers in (layers5, layers5[len(layers5) // 2: len(layers5) // 2 + 1]):
            label = f"{len(layers)} layer{'s' if len(layers) > 1 else ''}, {token_position}"
            ours_t, ours = timed(lambda: extract_caa_vectors(model, tokenizer, pairs, layers, token_position,
                                                             show_progress=False, batch_size=args.batch_size),
                                 args.repeats)
            ref_t, ref = timed(lambda: documented_loop(model, tokenizer, pairs, layers, token_position), 1)
            full_t, _ = timed(lambda: bare_forward(model, tokenizer, pairs, args.batch_size), args.repeats)
            stop_t, _ = timed(lambda: bare_forward(model, tokenizer, pairs, args.batch_size, max(layers)),
                              args.repeats)
            error = max(float((ours[l].vector.double() - ref[l].double()).norm() / ref[l].double().norm())
                        for l in layers)
            rows.append((label, ours_t, ref_t, full_t, stop_t, error))
            print(f"{label:>18}: ours {ours_t:7.2f}s  documented loop {ref_t:8.2f}s ({ref_t / ours_t:5.1f}x)"
                  f"  bare fwd full {full_t:6.2f}s  stopped {stop_t:6.2f}s (ours/stopped {ours_t / stop_t:.3f})"
                  f"  rel.err vs loop {error:.1e}", flush=True)
    write_results(args, model, pairs, layers5, rows)


def write_results(args, model, pairs, layers5, rows) -> None:
    name = getattr(model.config, "_name_or_path", "?")
    lines = [
        "# Extraction benchmark",
        "",
        f"{date.today().isoformat()}, {platform.machine()}, {torch.get_num_threads()} threads "
        f"(cores: {__import__('os').cpu_count()}), torch {torch.__version__}, python {sys.version.split()[0]}.",
        f"Model: `{name}`, {len(find_decoder_blocks(model))} blocks; {len(pairs)} refusal pairs "
        f"({2 * len(pairs)} texts); ours with batch_size={args.batch_size}; 5 layers = {layers5}.",
        f"Median of {args.repeats} runs (the documented loop: 1 run). "
        f"`{' '.join(['python', 'bench/bench_extraction.py', *sys.argv[1:]])}`.",
        "",
        "| workload | ours (s) | documented loop (s) | speed-up | bare forward, full (s) | bare forward, stopped (s) | ours / stopped | rel. L2 error vs loop |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for label, ours_t, ref_t, full_t, stop_t, error in rows:
        lines.append(f"| {label} | {ours_t:.2f} | {ref_t:.2f} | {ref_t / ours_t:.1f}x | {full_t:.2f} | {stop_t:.2f} "
                     f"| {ours_t / stop_t:.3f} | {error:.1e} |")
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
