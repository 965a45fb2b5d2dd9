"""Reference import path ``rotalabs_steer.core.vectors``."""

from ..vectors import SteeringVector, SteeringVectorSet

__all__ = ["SteeringVector", "SteeringVectorSet"]
