"""Benchmark driver for steering-vectors 0.12.2 (run in bench/.venvs/steering-vectors).

``train_steering_vector(model, tokenizer, [(positive, negative), ...], layers=...,
read_token_index=-1, aggregator=aggregator(), batch_size=B, show_progress=False)``:
mean(positive - negative) of the last token's block output, which equals CAA's
mean(positive) - mean(negative). It batches B pairs at a time and runs the B positive
texts, then the B negative texts, as two forwards of B rows each (so B texts per forward,
as ours), padded with the tokenizer's own padding side and pad token (it sets pad = EOS
when there is none) and read at the last real token. It has no mean-over-tokens mode:
token_position must be "last".

System "steering-vectors-pca" runs the same with ``aggregator=pca_aggregator()``: the top
principal direction of the paired differences (unit norm), a second pass for a second method.
"""

from __future__ import annotations

import _common


def main() -> None:
    job = _common.read_job()
    if job["token_position"] != "last":
        raise SystemExit("steering_vectors_driver: steering-vectors reads one token index; "
                         f"token_position={job['token_position']!r} has no equivalent")
    from steering_vectors import mean_aggregator, pca_aggregator, train_steering_vector

    layers = list(job["layers"])
    batch_size = int(job["batch_size"])
    aggregator = pca_aggregator if job["system"] == "steering-vectors-pca" else mean_aggregator

    def extract(model, tokenizer, pairs):
        vector = train_steering_vector(model, tokenizer, pairs, layers=layers, read_token_index=-1,
                                       aggregator=aggregator(), batch_size=batch_size,
                                       show_progress=False)
        return {layer: vector.layer_activations[layer] for layer in layers}

    _common.run(job, extract, {"steering-vectors": _common.package_version("steering-vectors")})


if __name__ == "__main__":
    main()
