"""Equivalence transforms: rotations and scalings folded into weights, SmoothQuant, QuaRot, OSTQuant, and the
QSUR diagnostic; the Hadamard matrices they use (``jquant.numerics.hadamard``) are re-exported here.

Every transform is a pure ``model -> model`` function on a model that declares its
residual-stream structure (``model.equivalence_layout()``, see ``layout``); recipes
run them as steps (``jquant.recipes.TransformStep``) before quantizing.
"""

from jquant.numerics.hadamard import (
    SMALL_HADAMARD_ORDERS,
    fwht,
    hadamard_factorization,
    hadamard_matrix,
    pad_to_hadamard_size,
    random_hadamard,
    random_orthogonal,
    supported_size,
)
from jquant.transforms.equivalence import (
    OnlineRotations,
    apply_transforms,
    check_params,
    fold,
    fold_norms,
    identity_params,
)
from jquant.transforms.layout import DecoderLayout, layout_of
from jquant.transforms.ostquant import OSTQuantConfig, OSTQuantResult, TrainingDiverged, ostquant, plot_losses, train_ostquant
from jquant.transforms.qsur import qsur, qsur_from_covariance
from jquant.transforms.report import QSURReport, qsur_report
from jquant.transforms.rotate import quarot, quarot_params
from jquant.transforms.smoothquant import smoothquant, smoothquant_params

__all__ = [
    "SMALL_HADAMARD_ORDERS",
    "DecoderLayout",
    "OSTQuantConfig",
    "OSTQuantResult",
    "OnlineRotations",
    "QSURReport",
    "TrainingDiverged",
    "apply_transforms",
    "check_params",
    "fold",
    "fold_norms",
    "fwht",
    "hadamard_factorization",
    "hadamard_matrix",
    "identity_params",
    "layout_of",
    "ostquant",
    "pad_to_hadamard_size",
    "plot_losses",
    "qsur",
    "qsur_from_covariance",
    "qsur_report",
    "quarot",
    "quarot_params",
    "random_hadamard",
    "random_orthogonal",
    "smoothquant",
    "smoothquant_params",
    "supported_size",
    "train_ostquant",
]
