"""What upstream's own scripts ``torch2onnx.py`` and ``inference.py`` ask facedistill, once patched.

Both built a 512-d network (``num_features=512``, or ``get_model``'s default) and loaded ``model.pt`` into it, so
the 128-d students of facedistill's recipes (``config.embedding_size = 128``) did not load; neither script takes
the config, so the size is read from the weights. ``torch2onnx.py`` also asked torch for its default exporter,
which is the dynamo one since torch 2.9 and needs onnxscript: the TorchScript exporter upstream was written for is
asked for by name, with a dynamic batch axis: traced without one, MobileFaceNet's ``Flatten``
(``x.view(x.size(0), -1)``) became a ``Reshape`` to the constant ``[1, -1]``, and upstream's ``onnx_helper.py``
failed on its batch of 32 (``GEMM: Dimension mismatch``).
"""

from __future__ import annotations

import inspect
import warnings
from pathlib import Path
from typing import Any

import torch

from facedistill.arcface_torch import refusals
from facedistill.models.iresnet import infer_backbone, strip_module_prefix

refusals.install()  # a refusal of these scripts' input is one line, as in train_v2.py


class WeightsError(ValueError):
    """A file that is not an arcface_torch backbone's weights; the message names it."""


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The backbone state_dict in ``path`` (``model.pt``, or a ``checkpoint_gpu_*.pt``'s backbone), on the CPU
    (a GPU run's tensors load on a machine without one), without unpickling anything but tensors."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for missing, corrupt, legacy or unsafe files
        message = f"{path} cannot be loaded as backbone weights ({type(error).__name__}: {error})"
        raise WeightsError(" ".join(message.split())) from None
    if isinstance(state, dict) and isinstance(state.get("state_dict_backbone"), dict):
        state = state["state_dict_backbone"]
    if not isinstance(state, dict) or not all(isinstance(value, torch.Tensor) for value in state.values()):
        raise WeightsError(f"{path} holds no state_dict of tensors; give train_v2.py's model.pt")
    return state


def embedding_size(weights: str | Path | dict[str, torch.Tensor]) -> int:
    """The embedding size of arcface_torch backbone weights: the registered backbone's reading of them
    (``models.iresnet.infer_backbone``, the one that loads teachers), else the length of their last 1-D tensor, the
    closing BatchNorm1d of every arcface_torch network (``features`` of iresnet and mbf, ``feature`` of vit)."""
    state = load_weights(weights) if isinstance(weights, str | Path) else weights
    inferred = infer_backbone(strip_module_prefix(state))
    if inferred is not None:
        return inferred[1]
    sizes = [int(value.shape[0]) for value in state.values() if value.ndim == 1]
    if not sizes:
        raise WeightsError(f"{weights if isinstance(weights, str | Path) else 'the state_dict'} has no 1-D tensor")
    return sizes[-1]


def onnx_export_options() -> dict[str, Any]:
    """``torch.onnx.export``'s keywords beside upstream's: the batch axis of input ``data`` dynamic, and the
    TorchScript exporter (torch < 2.5 has only that one and no ``dynamo`` keyword)."""
    options: dict[str, Any] = {"dynamic_axes": {"data": {0: "batch"}}}
    if "dynamo" in inspect.signature(torch.onnx.export).parameters:
        options["dynamo"] = False
        # Asked for by name: torch's notice (shown, as it names the calling script) that it is no longer the
        # default is not news here.
        warnings.filterwarnings(
            "ignore", message="You are using the legacy TorchScript-based ONNX export", category=DeprecationWarning
        )
    return options
