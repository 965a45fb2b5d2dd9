"""Conditional steering (CAST-style): steer a row only when its prompt activates a condition vector.

``SteeringCondition`` is what ``ActivationInjector(..., condition=...)`` takes;
``condition_scores`` computes the score it thresholds for a list of prompts (one stopped,
batched forward, reduced in C); ``find_condition_threshold`` picks the threshold and
comparator that best separate prompts to steer from prompts to leave alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, NamedTuple, Sequence

import numpy as np
import torch

from . import _core
from .extraction.batching import make_batches, pad_token_id, tokenize
from .extraction.forward import accumulate_batches
from .layers import find_decoder_blocks, hidden_size_of
from .validation import check_choice, check_strength, int_at_least, layer_in_range
from .vectors import SteeringVector

Comparator = Literal["greater", "less"]
COMPARATORS = ("greater", "less")


@dataclass
class SteeringCondition:
    """Steer a row only if its prompt activates ``vector`` past ``threshold``.

    The score of a row is the mean, over its real prompt tokens, of the output of block
    ``vector.layer_index`` projected on the unit vector; ``comparator="greater"`` steers rows
    whose score is above the threshold, ``"less"`` those below. The decision is made per row
    when the prompt is processed and kept for every generated token.
    """

    vector: SteeringVector
    threshold: float
    comparator: Comparator = "greater"

    def __post_init__(self) -> None:
        if not isinstance(self.vector, SteeringVector):
            raise TypeError(f"SteeringCondition: vector must be a SteeringVector, not {type(self.vector).__name__}")
        self.threshold = check_strength(self.threshold, "SteeringCondition: threshold")
        check_choice(self.comparator, COMPARATORS, "SteeringCondition: comparator")
        if self.vector.norm == 0.0 or not math.isfinite(self.vector.norm):
            raise ValueError("SteeringCondition: vector must be finite and non-zero")

    def passes(self, scores: torch.Tensor) -> torch.Tensor:
        return scores > self.threshold if self.comparator == "greater" else scores < self.threshold


class ThresholdChoice(NamedTuple):
    """The best threshold found, the comparator to use it with, and its F1 on the prompts given."""

    threshold: float
    comparator: Comparator
    f1: float

    def condition(self, vector: SteeringVector) -> SteeringCondition:
        return SteeringCondition(vector, self.threshold, self.comparator)


def condition_scores(model, tokenizer, vector: SteeringVector, prompts: Sequence[str], *, batch_size: int = 16,
                     max_length: int = 512, layer_modules=None) -> np.ndarray:
    """Per prompt, the score a SteeringCondition on ``vector`` thresholds (float64).

    Prompts are tokenized as the injector will see them: ``tokenizer(prompt)`` with its special
    tokens (apply the chat template first if generation will use it).
    """
    if not isinstance(vector, SteeringVector):
        raise TypeError(f"vector must be a SteeringVector, not {type(vector).__name__}")
    if isinstance(prompts, str) or not all(isinstance(p, str) and p for p in prompts) or not prompts:
        raise TypeError("prompts must be a non-empty list of non-empty str")
    batch_size = int_at_least(batch_size, "batch_size", 1)
    blocks = find_decoder_blocks(model, layer_modules)
    layer = layer_in_range(vector.layer_index, len(blocks), "vector.layer_index")
    token_ids, _ = tokenize(tokenizer, prompts, int_at_least(max_length, "max_length", 1))
    # One accumulator group per prompt: its sum is the prompt's mean row.
    batches = make_batches(token_ids, list(range(len(prompts))), "mean", batch_size, pad_token_id(tokenizer))
    accumulator = _core.Accumulator(1, hidden_size_of(model), len(prompts))
    accumulate_batches(model, [blocks.modules[layer]], batches, accumulator)
    sums, counts = accumulator.state()
    unit = vector.vector.detach().to(torch.float64).cpu().numpy()
    unit = unit / np.linalg.norm(unit)
    return (sums[0] / counts[0][:, None]) @ unit


def find_condition_threshold(model, tokenizer, vector: SteeringVector, positive_prompts: Sequence[str],
                             negative_prompts: Sequence[str], *, batch_size: int = 16, max_length: int = 512,
                             layer_modules=None) -> ThresholdChoice:
    """The threshold and comparator whose condition best tells ``positive_prompts`` (to steer)
    from ``negative_prompts`` (to leave alone), by F1; use prompts held out from the ones the
    condition vector was extracted from. ``choice.condition(vector)`` makes the SteeringCondition.
    """
    options = {"batch_size": batch_size, "max_length": max_length, "layer_modules": layer_modules}
    positive = condition_scores(model, tokenizer, vector, positive_prompts, **options)
    negative = condition_scores(model, tokenizer, vector, negative_prompts, **options)
    scores = np.concatenate([positive, negative])
    steer = np.concatenate([np.ones(len(positive), bool), np.zeros(len(negative), bool)])
    edges = np.unique(scores)
    # Midpoints between neighbouring scores, and one beyond each end.
    candidates = np.concatenate([[edges[0] - 1.0], (edges[:-1] + edges[1:]) / 2, [edges[-1] + 1.0]])
    best = ThresholdChoice(float(candidates[0]), "greater", -1.0)
    for comparator in COMPARATORS:
        for threshold in candidates:
            predicted = scores > threshold if comparator == "greater" else scores < threshold
            true_positive = np.sum(predicted & steer)
            f1 = 2 * true_positive / (predicted.sum() + steer.sum())
            if f1 > best.f1:
                best = ThresholdChoice(float(threshold), comparator, float(f1))
    return best
