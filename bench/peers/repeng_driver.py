"""Benchmark driver for repeng 0.4.0 (run in bench/.venvs/repeng).

``ControlVector.train(model, tokenizer, [DatasetEntry(positive, negative), ...],
hidden_layers=layers, batch_size=B, method="pca_diff")``: the first principal component
(scikit-learn PCA, which centres) of the paired differences of the last real token's
``hidden_states[layer + 1]``, signed by a majority vote over pairs. It keeps every row in
memory and runs the full model with ``output_hidden_states=True``, one method per pass.
It pads with the tokenizer's own padding side; a tokenizer without a pad token gets EOS.
Only token_position "last" has an equivalent.
"""

from __future__ import annotations

import _common


def main() -> None:
    job = _common.read_job()
    if job["token_position"] != "last":
        raise SystemExit(f"repeng_driver: repeng reads the last token only, not {job['token_position']!r}")
    import torch
    from repeng import ControlVector, DatasetEntry

    layers = list(job["layers"])
    batch_size = int(job["batch_size"])

    def extract(model, tokenizer, pairs):
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        dataset = [DatasetEntry(positive=positive, negative=negative) for positive, negative in pairs]
        vector = ControlVector.train(model, tokenizer, dataset, hidden_layers=layers, batch_size=batch_size,
                                     method="pca_diff")
        return {layer: torch.from_numpy(vector.directions[layer]) for layer in layers}

    _common.run(job, extract, {"repeng": _common.package_version("repeng")})


if __name__ == "__main__":
    main()
