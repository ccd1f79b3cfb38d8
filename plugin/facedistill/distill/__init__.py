"""Distillation methods, one module each, registered by name in ``METHODS``."""

from facedistill.distill import (  # noqa: F401  (registration)
    adadistill,
    angular,
    arcdistill,
    arcface,
    ekd,
    embedding,
    gkd,
    kd,
    margin_distillation,
    rkd,
    triplet,
)
from facedistill.distill.base import (
    METHODS,
    DistillMethod,
    MethodContext,
    create_method,
    method_class,
    method_params,
)

__all__ = ["METHODS", "DistillMethod", "MethodContext", "create_method", "method_class", "method_params"]
