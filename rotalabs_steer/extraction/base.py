"""The reference's base class for extraction methods (``rotalabs_steer.extraction.base``).

Code written against it (``method.extract(model, tokenizer, pairs, layers)``) runs unchanged;
``CAA``, ``PCA``, ``PCADiff`` and ``Fisher`` are this package's methods as such classes.
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


class _MomentMethod(ExtractionMethod):
    """A method made from the second moments of the paired differences (``extract_vectors``)."""

    def __init__(self, token_position: str = "last", **options) -> None:
        self.token_position = token_position
        self.options = options

    def extract(self, model, tokenizer, contrast_pairs, layer_indices: Sequence[int]) -> SteeringVectorSet:
        from .caa import extract_vectors

        return extract_vectors(model, tokenizer, contrast_pairs, layer_indices, self.name, self.token_position,
                               **{"show_progress": False, **self.options})


class PCA(_MomentMethod):
    """Top eigenvector of sum d d^T over paired differences d (uncentred PCA)."""

    name = "pca"


class PCADiff(_MomentMethod):
    """Top eigenvector of the covariance of the paired differences (repeng's ``pca_diff``)."""

    name = "pca_diff"


class Fisher(_MomentMethod):
    """(C + eps I)^-1 mean(d): the pair-centred LDA direction; option ``shrinkage`` (0.1)."""

    name = "fisher"
