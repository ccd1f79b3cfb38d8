"""Range checks of the hyper-parameters the methods share, for their ``Params.__post_init__``.

They raise ``ParamError`` naming the field as the dataclass does (``kd_weight``); ``facedistill.config.from_dict``
puts the front end's spelling in front (``method.kd_weight``, ``config.loss_params["kd_weight"]``), so one check
serves the toolkit's config and the arcface_torch recipe alike.
"""

from __future__ import annotations

import math

from facedistill.config import ParamError


def check_margin_loss(scale: float, margin: float | None) -> None:
    """The hard-label loss hyper-parameters every margin method has."""
    if scale <= 0:
        raise ParamError("scale", f"must be > 0, got {scale}")
    if margin is not None and not 0.0 <= margin < math.pi:
        raise ParamError("margin", f"must be in [0, pi), got {margin}")


def check_positive(key: str, value: float, allow_zero: bool = True) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise ParamError(key, f"must be {'>= 0' if allow_zero else '> 0'}, got {value}")


def check_unit_interval(key: str, value: float) -> None:
    """``value`` in (0, 1]: a rate, a momentum, a sampling fraction."""
    if not 0.0 < value <= 1.0:
        raise ParamError(key, f"must be in (0, 1], got {value}")
