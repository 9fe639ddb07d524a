"""Equivalence transforms: Hadamard matrices and rotations, and the QSUR diagnostic."""

from jquant.transforms.hadamard import (
    SMALL_HADAMARD_ORDERS,
    fwht,
    hadamard_factorization,
    hadamard_matrix,
    pad_to_hadamard_size,
    random_hadamard,
    random_orthogonal,
    supported_size,
)
from jquant.transforms.qsur import qsur, qsur_from_covariance

__all__ = [
    "SMALL_HADAMARD_ORDERS",
    "fwht",
    "hadamard_factorization",
    "hadamard_matrix",
    "pad_to_hadamard_size",
    "qsur",
    "qsur_from_covariance",
    "random_hadamard",
    "random_orthogonal",
    "supported_size",
]
