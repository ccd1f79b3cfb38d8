"""Parameter and multiply-accumulate (MAC) counts, with the convention face-recognition papers use.

Convention (the one behind "0.99M params / 221M MAdds" in Chen et al. 2018, "MobileFaceNets",
arXiv:1804.07573, and behind the "FLOPs" of insightface's arcface_torch tables, which its ``flops.py`` takes
from ptflops' MAC count, e.g. 12.1 G for r100):

* only ``nn.Conv2d`` (grouped and depthwise included) and ``nn.Linear`` layers count;
* one MAC is one multiply plus one add of a weight with an input; bias additions are not counted;
* BatchNorm, PReLU/ReLU, element-wise residual additions, pooling and dropout are not counted, since at
  inference BN folds into the preceding convolution and the rest is negligible next to the convolutions;
* the count is for one image (batch of 1).

Tools such as ptflops or fvcore add some of the excluded terms, so their totals come out slightly higher.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["count_macs", "count_parameters", "format_count"]


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of scalars in ``model.parameters()``.

    Frozen parameters (such as the fixed-to-one ``features.weight`` of arcface_torch's IResNet) are counted
    unless ``trainable_only`` is set, since papers report the size of the deployed network.
    """
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def _conv_macs(module: nn.Conv2d, output: torch.Tensor) -> int:
    # Every output element is a dot product over (in_channels / groups) * kh * kw inputs of its group.
    kh, kw = module.kernel_size
    per_output = (module.in_channels // module.groups) * kh * kw
    return output.numel() * per_output


def _linear_macs(module: nn.Linear, output: torch.Tensor) -> int:
    return output.numel() * module.in_features


def count_macs(model: nn.Module, input_size: Sequence[int] = (3, 112, 112)) -> int:
    """MACs of one forward pass of a single ``input_size`` image, counted as the module docstring says.

    Runs the model in eval mode under ``torch.no_grad`` on a zero tensor on the model's device and dtype,
    then restores the model's previous train/eval mode. A module that runs several times per forward is
    counted every time it runs.
    """
    total = 0

    def conv_hook(module: nn.Module, _inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        nonlocal total
        assert isinstance(module, nn.Conv2d)
        total += _conv_macs(module, output)

    def linear_hook(module: nn.Module, _inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        nonlocal total
        assert isinstance(module, nn.Linear)
        total += _linear_macs(module, output)

    handles = []
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            handles.append(module.register_forward_hook(conv_hook))
        elif isinstance(module, nn.Linear):
            handles.append(module.register_forward_hook(linear_hook))

    reference = next(iter(model.parameters()), None)
    device = reference.device if reference is not None else torch.device("cpu")
    dtype = reference.dtype if reference is not None and reference.is_floating_point() else torch.float32
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, *input_size, device=device, dtype=dtype))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return total


_UNITS: dict[str, float] = {"": 1.0, "K": 1e3, "M": 1e6, "G": 1e9}


def format_count(n: int | float, unit: str | None = None) -> str:
    """Human-readable count in the units papers use: ``"1.20 M"``, ``"0.23 G"``, ``"512"``.

    Without ``unit``, values from 0.1 G upwards are written in G so MAC counts read as tables print them
    ("0.23 G" for MobileFaceNet rather than "228.00 M"); smaller values of a thousand or more use M or K.
    Pass ``unit`` ("", "K", "M" or "G") to force one, e.g. to print every row of a table in M.
    """
    value = float(n)
    if unit is None:
        magnitude = abs(value)
        unit = "G" if magnitude >= 1e8 else "M" if magnitude >= 1e5 else "K" if magnitude >= 1e3 else ""
    if unit not in _UNITS:
        raise ValueError(f"unit must be one of {sorted(_UNITS)}, got {unit!r}")
    if unit == "":
        return f"{value:g}"
    return f"{value / _UNITS[unit]:.2f} {unit}"
