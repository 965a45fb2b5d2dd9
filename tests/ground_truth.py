"""Float64 ground truth: unbatched per-text forwards of a float64 copy of the model."""

from __future__ import annotations

import copy

import torch

from rotalabs_steer.layers import component_module, find_decoder_blocks


def block_outputs(model, input_ids: list[int], layers: list[int], component: str = "residual"
                  ) -> dict[int, torch.Tensor]:
    """Output of each requested block (or its mlp / attn) for one unpadded text: {layer: [seq, hidden]}."""
    blocks = [component_module(block, component)[0] for block in find_decoder_blocks(model).modules]
    captured: dict[int, torch.Tensor] = {}

    def keep(layer):
        def hook(module, args, output):
            hidden = output[0] if isinstance(output, tuple) else output
            # [1, seq, hidden]; OPT's MLP returns its rows flattened, [seq, hidden] for one text.
            captured[layer] = (hidden[0] if hidden.dim() == 3 else hidden).detach().clone()
        return hook

    handles = [blocks[layer].register_forward_hook(keep(layer)) for layer in layers]
    try:
        with torch.no_grad():
            model(input_ids=torch.tensor([input_ids]), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return captured


def select(hidden: torch.Tensor, token_position: str) -> torch.Tensor:
    if token_position == "last":
        return hidden[-1]
    if token_position == "first":
        return hidden[0]
    return hidden.mean(dim=0)


def caa_truth(model, tokenizer, pairs, layers, token_position, max_length=512, component="residual"
              ) -> dict[int, torch.Tensor]:
    """{layer: mean(pos) - mean(neg)} in float64, one text per forward."""
    model64 = copy.deepcopy(model).to(torch.float64)
    sums = {layer: [torch.zeros((), dtype=torch.float64)] * 2 for layer in layers}
    for side in (0, 1):
        for pair in pairs:
            text = pair["positive"] if side == 0 else pair["negative"]
            ids = tokenizer(text, truncation=True, max_length=max_length)["input_ids"]
            for layer, hidden in block_outputs(model64, ids, layers, component).items():
                sums[layer][side] = sums[layer][side] + select(hidden, token_position)
    return {layer: (s[0] - s[1]) / len(pairs) for layer, s in sums.items()}


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want).norm() / want.norm())


def pair_rows(model, tokenizer, pairs, layers, token_positions, max_length=512, component="residual"
              ) -> dict[str, dict[int, tuple[torch.Tensor, torch.Tensor]]]:
    """{token_position: {layer: (positive rows, negative rows)}}, float64 [pairs, hidden] each,
    one text per forward (shared by every position)."""
    model64 = copy.deepcopy(model).to(torch.float64)
    rows = {position: {layer: ([], []) for layer in layers} for position in token_positions}
    for pair in pairs:
        for side, key in enumerate(("positive", "negative")):
            ids = tokenizer(pair[key], truncation=True, max_length=max_length)["input_ids"]
            for layer, hidden in block_outputs(model64, ids, layers, component).items():
                for position in token_positions:
                    rows[position][layer][side].append(select(hidden, position))
    return {position: {layer: (torch.stack(pos), torch.stack(neg)) for layer, (pos, neg) in by_layer.items()}
            for position, by_layer in rows.items()}
