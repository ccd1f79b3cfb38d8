"""Distillation methods, one module each, registered by name in ``METHODS``."""

from facedistill.distill import arcface, margin_distillation  # noqa: F401  (registration)
from facedistill.distill.base import METHODS, DistillMethod, MethodContext, create_method

__all__ = ["METHODS", "DistillMethod", "MethodContext", "create_method"]
