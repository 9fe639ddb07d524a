"""Optimisers for learned equivalence transforms: Riemannian Adam / Cayley SGD on the Stiefel manifold."""

from jquant.optim.stiefel import ROTATION_LR as ROTATION_LR
from jquant.optim.stiefel import SCALE_LR as SCALE_LR
from jquant.optim.stiefel import CayleySGDState as CayleySGDState
from jquant.optim.stiefel import RiemannianAdamState as RiemannianAdamState
from jquant.optim.stiefel import canonical_sq_norm as canonical_sq_norm
from jquant.optim.stiefel import cayley_retract as cayley_retract
from jquant.optim.stiefel import cayley_sgd as cayley_sgd
from jquant.optim.stiefel import ostquant_optimizer as ostquant_optimizer
from jquant.optim.stiefel import project_tangent as project_tangent
from jquant.optim.stiefel import project_to_stiefel as project_to_stiefel
from jquant.optim.stiefel import riemannian_adam as riemannian_adam
from jquant.optim.stiefel import stiefel_labels as stiefel_labels

__all__ = [
    "ROTATION_LR",
    "SCALE_LR",
    "CayleySGDState",
    "RiemannianAdamState",
    "canonical_sq_norm",
    "cayley_retract",
    "cayley_sgd",
    "ostquant_optimizer",
    "project_tangent",
    "project_to_stiefel",
    "riemannian_adam",
    "stiefel_labels",
]
