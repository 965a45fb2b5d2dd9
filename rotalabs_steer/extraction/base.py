"""The reference's base class for extraction methods (``rotalabs_steer.extraction.base``).

Code written against it (``method.extract(model, tokenizer, pairs, layers)``) runs unchanged;
``CAA`` is this package's CAA as such a method.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Sequence

from ..vectors import SteeringVectorSet


class ExtractionMethod(ABC):
    """A way of turning contrast pairs into one steering vector per layer."""

    name: str = "base"

    @abstractmethod
    def extract(self, model, tokenizer, contrast_pairs, layer_indices: Sequence[int]) -> SteeringVectorSet:
        """Steering vectors of ``layer_indices`` from ``contrast_pairs``."""


class CAA(ExtractionMethod):
    """Contrastive Activation Addition; keywords are those of ``extract_caa_vectors``."""

    name = "caa"

    def __init__(self, token_position: str = "last", **options) -> None:
        self.token_position = token_position
        self.options = options

    def extract(self, model, tokenizer, contrast_pairs, layer_indices: Sequence[int]) -> SteeringVectorSet:
        from .caa import extract_caa_vectors

        return extract_caa_vectors(model, tokenizer, contrast_pairs, layer_indices, self.token_position,
                                   **{"show_progress": False, **self.options})
