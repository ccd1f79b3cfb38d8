"""Checkpoints written atomically (temporary file, flush, fsync, rename) and read with ``weights_only=True``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    """A crash while writing leaves the previous checkpoint at ``path`` intact."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as handle:
        torch.save(state, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load without unpickling arbitrary objects; errors name the file."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # torch raises several types for corrupt or unsafe files
        raise ValueError(f"checkpoint {path} cannot be loaded safely: {error}") from None


def load_student(path: str | Path, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, dict[str, Any]]:
    """The student backbone of a checkpoint, in eval mode, and its config: a facedistill checkpoint
    (``last.pt``/``best.pt``) or an arcface_torch ``model.pt`` (a bare backbone state_dict, whose network is
    recognised from its keys and shapes; its config then names only the model and ``method: arcface_torch``)."""
    from facedistill.models import create_model
    from facedistill.models.iresnet import describe_checkpoint_architecture, infer_backbone, strip_module_prefix

    state = load_checkpoint(path, device)
    if "model" in state and "config" in state:
        config = state["config"]
        model_section = config["model"]
        model = create_model(model_section["name"], embedding_size=model_section["embedding_size"])
        weights = state["model"]
    elif state and all(isinstance(value, torch.Tensor) for value in state.values()):
        weights = strip_module_prefix(state)
        inferred = infer_backbone(weights)
        if inferred is None:
            raise ValueError(
                f"{path} is a bare state_dict of {describe_checkpoint_architecture(weights)}, which no registered "
                "backbone matches (arcface_torch mbf and r18/r34/r50/r100 are supported)"
            )
        name, embedding_size, kwargs = inferred
        model = create_model(name, embedding_size=embedding_size, **kwargs)
        model_section = {"name": name, "embedding_size": embedding_size, **kwargs}
        config = {"model": model_section, "method": {"name": "arcface_torch"}}
    else:
        raise ValueError(
            f"{path} is neither a facedistill training checkpoint (no 'model' and 'config') nor an arcface_torch "
            "model.pt (a backbone state_dict)"
        )
    model.load_state_dict(weights)
    # Convolutional nets run markedly faster in channels_last on CPU and on GPU.
    return model.to(device, memory_format=torch.channels_last).eval(), config
