"""Teachers that run a PyTorch backbone from an arcface_torch or facedistill checkpoint.

Checkpoints are always read with ``torch.load(weights_only=True)``: a teacher file downloaded from the
internet must not be able to run code.

Margin-head (class-centre) files written by insightface ``recognition/arcface_torch``, all accepted by
:func:`load_head_centres`; shards are concatenated in rank order, because rank ``r`` owns the contiguous
class block starting at ``num_classes // world_size * r + min(r, num_classes % world_size)``:

==============================  =============================================  ==========================
file name (per rank)            content                                        arcface_torch version
==============================  =============================================  ==========================
``rank:{r}_softmax_weight.pt``  bare tensor ``[num_local, d]``                 2021-03 ``partial_fc.py``
``rank_{r}_softmax_weight.pt``  bare tensor ``[num_local, d]``                 2021-05 ``partial_fc.py``
``softmax_fc_gpu_{r}.pt``       ``{"weight": [num_local, d]}``                 2022 ``train.py``
``checkpoint_gpu_{r}.pt``       ``{"state_dict_softmax_fc": {"weight": ...}}`` ``train_v2.py`` resume files
==============================  =============================================  ==========================

``rank*_softmax_weight_mom.pt`` files hold SGD momentum, not centres, and are never read. A dict whose only
centre key is ``"weight_activated"`` (the 2022 ``PartialFC`` parameter, before its ``state_dict`` override) is
accepted too.
"""

from __future__ import annotations

import os
import pickle
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from facedistill.models.iresnet import load_strictly, strip_module_prefix
from facedistill.teachers.base import (
    TEACHERS,
    Preprocessing,
    Teacher,
    check_images,
    make_teacher_id,
    sha256_file,
)

ARCFACE_PREPROCESSING = Preprocessing(colour_order="RGB", mean=127.5, std=127.5)

_SHARD_NAMES = "checkpoint_gpu_<rank>.pt, softmax_fc_gpu_<rank>.pt or rank_<rank>_softmax_weight.pt"
_SHARD_PATTERNS = (
    re.compile(r"^softmax_fc_gpu_(\d+)\.pt$"),
    re.compile(r"^checkpoint_gpu_(\d+)\.pt$"),
    re.compile(r"^rank[_:](\d+)_softmax_weight\.pt$"),
)


def _load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ValueError(
            f"{path} cannot be read with torch.load(weights_only=True) (it pickles Python objects, not just "
            f"tensors), and teacher files are never unpickled unsafely: {exc}"
        ) from None


def _is_state_dict(obj: object) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def _centres_from(obj: object, source: Path) -> torch.Tensor:
    if isinstance(obj, Mapping) and "state_dict_softmax_fc" in obj:
        obj = obj["state_dict_softmax_fc"]
    if isinstance(obj, torch.Tensor):
        weight = obj
    elif isinstance(obj, Mapping) and isinstance(obj.get("weight"), torch.Tensor) and obj["weight"].numel():
        weight = obj["weight"]
    elif isinstance(obj, Mapping) and isinstance(obj.get("weight_activated"), torch.Tensor):
        weight = obj["weight_activated"]
    else:
        keys = sorted(obj) if isinstance(obj, Mapping) else type(obj).__name__
        raise ValueError(f"{source}: no margin-head weights (expected a tensor or key 'weight'; got {keys})")
    if weight.ndim != 2:
        raise ValueError(f"{source}: head weight must be [classes, d], got shape {list(weight.shape)}")
    return weight.detach().to(torch.float32)


def _shard_rank(path: Path) -> tuple[int, int] | None:
    for kind, pattern in enumerate(_SHARD_PATTERNS):
        match = pattern.match(path.name)
        if match:
            return kind, int(match.group(1))
    return None


def order_shard_files(paths: Sequence[str | os.PathLike[str]], where: str) -> list[Path]:
    """Per-rank head files in rank order (numeric: rank 10 after rank 9), refusing a name that is not a shard's,
    a doubled or missing rank, mixed naming schemes and missing files: any of them would shift class blocks."""
    ranked: dict[int, Path] = {}
    kinds: set[int] = set()
    for raw in paths:
        path = Path(raw)
        parsed = _shard_rank(path)
        if parsed is None:
            raise ValueError(f"{path} is not named like a teacher head shard ({_SHARD_NAMES})")
        kind, rank = parsed
        kinds.add(kind)
        if rank in ranked:
            raise ValueError(f"teacher rank {rank} is given twice: {ranked[rank]} and {path}; keep one run's files")
        ranked[rank] = path
    if not ranked:
        raise ValueError(f"no teacher head shards in {where}")
    if len(kinds) > 1:
        names = ", ".join(sorted(p.name for p in ranked.values()))
        raise ValueError(f"teacher head shards in {where} mix naming schemes ({names}): pass one run's files")
    missing = sorted(set(range(max(ranked) + 1)) - set(ranked))
    if missing:
        names = ", ".join(ranked[r].name for r in sorted(ranked))
        raise ValueError(
            f"teacher head shards in {where} lack rank(s) {missing} (found {names}): every rank's file is needed, "
            "since each holds a different block of classes"
        )
    missing_files = [str(ranked[r]) for r in sorted(ranked) if not ranked[r].is_file()]
    if missing_files:
        raise FileNotFoundError(f"teacher head shard(s) not found: {', '.join(missing_files)}")
    return [ranked[r] for r in sorted(ranked)]


def merge_partial_fc_shards(paths: Sequence[str | os.PathLike[str]]) -> torch.Tensor:
    """Concatenate per-rank PartialFC centre files into ``[C, d]``, ordered by the rank in each file name.

    Ranks must be exactly ``0..N-1`` of one naming scheme (``order_shard_files``).
    """
    ordered = order_shard_files(paths, "the given files")
    parts = [_centres_from(_load(path), path) for path in ordered]
    widths = {part.shape[1] for part in parts}
    if len(widths) != 1:
        raise ValueError(f"PartialFC shards disagree on the embedding size: {sorted(widths)}")
    return torch.cat(parts, dim=0)


def load_head_centres(source: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]) -> torch.Tensor:
    """Margin-head class centres ``[C, d]`` from a file, a shard file, a folder or a list of shards.

    A single file named like a shard (``softmax_fc_gpu_0.pt``, ...) pulls in all its sibling shards of the
    same scheme, since one rank alone holds only a slice of the classes. Any other file must hold a tensor
    or a dict with ``"weight"``.
    """
    if isinstance(source, (list, tuple)):
        return merge_partial_fc_shards(source)
    path = Path(source)  # type: ignore[arg-type]
    if path.is_dir():
        for pattern in _SHARD_PATTERNS:
            shards = [p for p in path.iterdir() if pattern.match(p.name)]
            if shards:
                return merge_partial_fc_shards(shards)
        raise FileNotFoundError(f"no PartialFC shards (softmax_fc_gpu_<rank>.pt, ...) in {path}")
    if not path.is_file():
        raise FileNotFoundError(f"head checkpoint not found: {path}")
    parsed = _shard_rank(path)
    if parsed is not None:
        pattern = _SHARD_PATTERNS[parsed[0]]
        return merge_partial_fc_shards([p for p in path.parent.iterdir() if pattern.match(p.name)])
    return _centres_from(_load(path), path)


@TEACHERS.register("torch")
class TorchTeacher(Teacher):
    """A PyTorch backbone loaded from a checkpoint.

    Accepted ``checkpoint_path`` contents:

    * an insightface arcface_torch ``backbone.pth``/``model.pt``: a bare state_dict; ``arch`` is required
      (a ``facedistill.models`` name such as ``"iresnet50"``). ``embedding_size`` defaults to the rows of
      ``fc.weight`` when present, else 512. ``state_dict_backbone`` of ``checkpoint_gpu_<r>.pt`` also works;
    * a facedistill training checkpoint: ``{"model": state_dict, "config": {"model": {"name": ...,
      "embedding_size": ..., ...}}, "head": {"weight": [C, d]}}`` (head optional); the other
      ``config["model"]`` keys go to ``create_model`` and ``head["weight"]`` becomes :meth:`class_centres`.

    ``head_checkpoint`` supplies arcface_torch margin-head centres (see the module docstring for the files).
    ``model`` skips ``create_model`` and loads the weights into the given module (tests, custom nets).
    The model runs in eval mode under ``torch.inference_mode``.
    """

    def __init__(
        self,
        checkpoint_path: str | os.PathLike[str],
        arch: str | None = None,
        embedding_size: int | None = None,
        preprocessing: Preprocessing | dict | tuple = ARCFACE_PREPROCESSING,
        batch_size: int = 128,
        device: str | torch.device = "cpu",
        head_checkpoint: str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | None = None,
        model: nn.Module | None = None,
        model_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        self.checkpoint_path = Path(checkpoint_path)
        if not self.checkpoint_path.is_file():
            raise FileNotFoundError(f"teacher checkpoint not found: {self.checkpoint_path}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.preprocessing = Preprocessing.coerce(preprocessing)
        self.batch_size = batch_size
        self.device = torch.device(device)

        loaded = _load(self.checkpoint_path)
        centres: torch.Tensor | None = None
        kwargs: dict[str, Any] = {}
        if isinstance(loaded, Mapping) and isinstance(loaded.get("model"), Mapping):
            config = loaded.get("config") or {}
            model_cfg = dict(config.get("model") or {}) if isinstance(config, Mapping) else {}
            saved_arch = model_cfg.pop("name", None)
            arch = arch or saved_arch
            saved_size = model_cfg.pop("embedding_size", None)
            embedding_size = embedding_size or (int(saved_size) if saved_size is not None else None)
            kwargs = model_cfg
            state = loaded["model"]
            head = loaded.get("head")
            if head is not None:
                centres = _centres_from(head, self.checkpoint_path)
        elif isinstance(loaded, Mapping) and _is_state_dict(loaded.get("state_dict_backbone")):
            state = loaded["state_dict_backbone"]
        elif _is_state_dict(loaded):
            state = loaded
        else:
            raise ValueError(
                f"{self.checkpoint_path} is neither a state_dict (arcface_torch backbone.pth) nor a "
                "facedistill checkpoint with a 'model' entry"
            )
        state = strip_module_prefix(state)
        kwargs.update(model_kwargs or {})

        if model is None:
            if not arch:
                raise ValueError(
                    f"{self.checkpoint_path.name} is a bare state_dict (an arcface_torch backbone.pth?) and "
                    "does not say which network it belongs to: pass arch=..., e.g. arch='iresnet50'"
                )
            if embedding_size is None:
                fc = state.get("fc.weight")
                embedding_size = int(fc.shape[0]) if fc is not None and fc.ndim == 2 else 512
            from facedistill.models import create_model

            model = create_model(arch, embedding_size=embedding_size, **kwargs)
        load_strictly(model, state, str(self.checkpoint_path))
        self.model = model.to(self.device).eval()
        self.arch = arch or type(model).__name__.lower()
        self.embedding_size = embedding_size or self._probe_embedding_size()

        if head_checkpoint is not None:
            centres = load_head_centres(head_checkpoint)
        if centres is not None and centres.shape[1] != self.embedding_size:
            raise ValueError(
                f"head centres are {list(centres.shape)} but the backbone gives {self.embedding_size}-d "
                "embeddings; expected [classes, embedding_size]"
            )
        self._centres = centres
        self.weights_sha256 = sha256_file(self.checkpoint_path)
        self.teacher_id = make_teacher_id(self.arch, self.weights_sha256, self.preprocessing)

    def _probe_embedding_size(self) -> int:
        with torch.inference_mode():
            out = self._forward(torch.zeros(2, 3, 112, 112, device=self.device))
        return int(out.shape[1])

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        if isinstance(out, (tuple, list)):  # some backbones also return feature norms
            out = out[0]
        return out.reshape(out.shape[0], -1)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        check_images(images, who=f"teacher {self.teacher_id}")
        chunks = []
        with torch.inference_mode():
            for start in range(0, images.shape[0], self.batch_size):
                x = self.preprocessing.apply(images[start : start + self.batch_size].to(self.device))
                chunks.append(self._forward(x).float().cpu())
        if not chunks:
            return torch.empty(0, self.embedding_size, dtype=torch.float32)
        out = torch.cat(chunks)
        if out.shape[1] != self.embedding_size:
            raise RuntimeError(f"{self.teacher_id}: {out.shape[1]}-d output, expected {self.embedding_size}")
        return out

    def class_centres(self) -> torch.Tensor | None:
        return self._centres
