"""Benchmark driver for this package, and for the bare-forward baselines (run in .venv).

  ours          extract_caa_vectors(..., batch_size=B, show_progress=False), defaults otherwise
  bare-full     the same right-padded, length-bucketed batches through the model, no hooks
  bare-stopped  the same, stopped after the deepest requested block (an exception raised
                by a hook on it: the least any block-output reader must compute)
  ours-methods  collect_pair_statistics(..., batch_size=B) once, then .vectors(method) for
                caa, pca, pca_diff and fisher (every method from one pass)

Both bare forwards tokenize inside the timed region, as extraction does.
"""

from __future__ import annotations

import _common


class _Stop(Exception):
    pass


def bare_forward(model, tokenizer, pairs, batch_size, stop_after=None, max_length=512):
    """The unavoidable compute: the batches ours runs, without hooks (optionally cut after a block)."""
    import torch

    from rotalabs_steer.extraction.batching import make_batches, pad_token_id, tokenize
    from rotalabs_steer.model_control import input_device
    from rotalabs_steer.layers import find_decoder_blocks

    texts = [p for p, _ in pairs] + [n for _, n in pairs]
    ids, _ = tokenize(tokenizer, texts, max_length)
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
    return None


def main() -> None:
    job = _common.read_job()
    system, layers, batch_size = job["system"], job["layers"], int(job["batch_size"])

    if system == "ours":
        from rotalabs_steer.datasets import ContrastPairDataset
        from rotalabs_steer.extraction import extract_caa_vectors

        def extract(model, tokenizer, pairs):
            dataset = ContrastPairDataset(job["behavior"])
            for positive, negative in pairs:
                dataset.add_pair(positive, negative)
            result = extract_caa_vectors(model, tokenizer, dataset, layers, job["token_position"],
                                         show_progress=False, batch_size=batch_size)
            return {layer: result.get(layer).vector for layer in layers}
    elif system == "ours-methods":
        from rotalabs_steer.extraction import METHODS, collect_pair_statistics

        def extract(model, tokenizer, pairs):
            records = [{"positive": positive, "negative": negative} for positive, negative in pairs]
            stats = collect_pair_statistics(model, tokenizer, records, layers, job["token_position"],
                                            show_progress=False, batch_size=batch_size)
            # One pair (the warm-up): its centred difference is zero, so pca_diff has no direction.
            methods = METHODS if len(pairs) > 1 else [m for m in METHODS if m != "pca_diff"]
            return {method: {layer: stats.vectors(method).get(layer).vector for layer in layers}
                    for method in methods}
    elif system == "bare-full":
        def extract(model, tokenizer, pairs):
            return bare_forward(model, tokenizer, pairs, batch_size)
    elif system == "bare-stopped":
        def extract(model, tokenizer, pairs):
            return bare_forward(model, tokenizer, pairs, batch_size, stop_after=max(layers))
    else:
        raise SystemExit(f"ours_driver: unknown system {system!r}")

    from pathlib import Path

    import rotalabs_steer

    # Which copy ran, relative to the repository (an absolute path would name this machine).
    where = Path(rotalabs_steer.__file__).resolve()
    repo = Path(__file__).resolve().parents[2]
    where = where.relative_to(repo) if where.is_relative_to(repo) else Path("<outside the repository>")
    _common.run(job, extract, {"rotalabs_steer (ours)": getattr(rotalabs_steer, "__version__", "?"),
                               "rotalabs_steer_path": str(where)})


if __name__ == "__main__":
    main()
