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
    """The student backbone of a facedistill checkpoint (``last.pt``/``best.pt``), in eval mode, and its config."""
    from facedistill.models import create_model

    state = load_checkpoint(path, device)
    if "model" not in state or "config" not in state:
        raise ValueError(f"{path} is not a facedistill training checkpoint (it has no 'model' and 'config')")
    model_section = state["config"]["model"]
    model = create_model(model_section["name"], embedding_size=model_section["embedding_size"])
    model.load_state_dict(state["model"])
    # Convolutional nets run markedly faster in channels_last on CPU and on GPU.
    return model.to(device, memory_format=torch.channels_last).eval(), state["config"]
