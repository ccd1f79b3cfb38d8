"""Export embedding models to ONNX with a fixed, self-describing I/O convention.

Convention of every facedistill ONNX file (also written into the model's ``metadata_props``):

* input ``"input"``: float32, NCHW, RGB, ``112 x 112`` by default, normalised as ``(x - 127.5) / 127.5``, said
  in text (``facedistill.input``) and in keys an ONNX teacher reads (``facedistill.colour_order``, ``.mean``,
  ``.std``), so that ``facedistill eval --teacher model.onnx`` and distillation from it need nothing else;
* output ``"embedding"``: ``[B, d]`` raw embedding, *not* L2-normalised (the norm carries quality
  information some consumers use; normalising is one line downstream, un-normalising is impossible);
* dynamic batch dimension, opset >= 17.
"""

from __future__ import annotations

import copy
import importlib.util
import inspect
import os
import uuid
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import nn

from facedistill import __version__

__all__ = [
    "INPUT_COLOUR_ORDER",
    "INPUT_MEAN",
    "INPUT_METADATA",
    "INPUT_NAME",
    "INPUT_STD",
    "MIN_OPSET",
    "OUTPUT_NAME",
    "PREPROCESSING_METADATA",
    "ExportReport",
    "export_onnx",
    "read_onnx_metadata",
    "verify_onnx",
]

INPUT_NAME = "input"
OUTPUT_NAME = "embedding"
MIN_OPSET = 17
_META_PREFIX = "facedistill."
# How an exported model's input is made from raw 0..255 RGB faces: as the student was trained
# (facedistill.data.images.normalise).
INPUT_COLOUR_ORDER = "RGB"
INPUT_MEAN = 127.5
INPUT_STD = 127.5
# The metadata keys that say it to a machine (Preprocessing's fields -> key); facedistill.input says it to a person.
PREPROCESSING_METADATA = {field: f"{_META_PREFIX}{field}" for field in ("colour_order", "mean", "std")}
INPUT_METADATA = f"{_META_PREFIX}input"
# Trace with one batch size and verify with another, so a batch size baked into the graph cannot pass.
_TRACE_BATCH = 2
_VERIFY_BATCH = 4

Exporter = Literal["auto", "torchscript", "dynamo"]


@dataclass(frozen=True)
class ExportReport:
    """Outcome of :func:`export_onnx`. ``max_abs_diff`` is None when verification was skipped."""

    path: Path
    max_abs_diff: float | None
    opset: int
    embedding_size: int
    input_size: tuple[int, int]
    exporter: str
    metadata: dict[str, str] = field(default_factory=dict)


def _unwrap(model: nn.Module) -> nn.Module:
    # DDP/DataParallel and torch.compile wrappers neither export cleanly nor name the real architecture.
    while True:
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def _cpu_eval_copy(model: nn.Module) -> nn.Module:
    # A deep copy leaves the caller's model untouched: its device, train/eval flags and BN statistics.
    net = copy.deepcopy(_unwrap(model)).cpu().float().eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return net


def _as_input_tensor(batch: torch.Tensor | np.ndarray) -> torch.Tensor:
    x = torch.as_tensor(batch).detach().cpu().float().contiguous()
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"expected an NCHW batch with 3 channels, got shape {tuple(x.shape)}")
    return x


def _embed(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = net(x)
    if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[0] != x.shape[0]:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise TypeError(f"model must map [B, 3, H, W] to a [B, d] embedding tensor, got {shape}")
    return out


def _ort_session(onnx_path: str | os.PathLike[str]):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # ORT's info/warning chatter about initialisers is noise here
    return ort.InferenceSession(str(onnx_path), sess_options=opts, providers=["CPUExecutionProvider"])


def _max_abs_diff(onnx_path: str | os.PathLike[str], net: nn.Module, x: torch.Tensor) -> float:
    ref = _embed(net, x).numpy()
    got = _ort_session(onnx_path).run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})[0]
    if got.shape != ref.shape:
        raise RuntimeError(f"ONNX output shape {got.shape} != PyTorch output shape {ref.shape}")
    return float(np.max(np.abs(got.astype(np.float64) - ref.astype(np.float64))))


def verify_onnx(onnx_path: str | os.PathLike[str], model: nn.Module, batch: torch.Tensor | np.ndarray) -> float:
    """Max absolute difference between onnxruntime (CPU) and the PyTorch model (CPU, eval) on ``batch``.

    ``batch`` is an already normalised float NCHW batch. The model is copied, so its state is untouched.
    """
    return _max_abs_diff(onnx_path, _cpu_eval_copy(model), _as_input_tensor(batch))


def read_onnx_metadata(onnx_path: str | os.PathLike[str]) -> dict[str, str]:
    """The ``metadata_props`` of an ONNX file as a dict (weights are not loaded)."""
    import onnx  # imported where used: onnx costs every process that imports this module seconds at start

    proto = onnx.load(str(onnx_path), load_external_data=False)
    return {p.key: p.value for p in proto.metadata_props}


def _resolve_exporter(exporter: Exporter) -> str:
    if "dynamo" not in inspect.signature(torch.onnx.export).parameters:
        # torch < 2.5 only has the TorchScript exporter and rejects the keyword.
        if exporter == "dynamo":
            raise RuntimeError("this torch version has no dynamo ONNX exporter")
        return "torchscript-legacy"
    if exporter == "auto":
        # The dynamo exporter is torch's default but hard-requires onnxscript.
        return "dynamo" if importlib.util.find_spec("onnxscript") is not None else "torchscript"
    if exporter == "dynamo" and importlib.util.find_spec("onnxscript") is None:
        raise RuntimeError("exporter='dynamo' needs the onnxscript package")
    return exporter


def _torch_export(net: nn.Module, dummy: torch.Tensor, path: str, opset: int, how: str) -> None:
    kwargs: dict = {"input_names": [INPUT_NAME], "output_names": [OUTPUT_NAME], "opset_version": opset}
    if how == "dynamo":
        # dynamic_axes cannot be translated when the input name differs from forward()'s argument name, so
        # the batch dim is declared positionally; external_data=False keeps a single self-contained file.
        kwargs.update(
            dynamo=True,
            verbose=False,  # otherwise it prints progress lines to stdout
            external_data=False,
            dynamic_shapes=({0: torch.export.Dim("batch")},),
        )
    else:
        kwargs["dynamic_axes"] = {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}}
        if how == "torchscript":
            kwargs["dynamo"] = False
    with torch.no_grad(), warnings.catch_warnings():
        if how != "dynamo":
            # The legacy exporter is chosen deliberately (no onnxscript); its deprecation notices are noise.
            warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(net, (dummy,), path, **kwargs)


def export_onnx(
    model: nn.Module,
    out_path: str | os.PathLike[str],
    input_size: tuple[int, int] = (112, 112),
    opset: int = MIN_OPSET,
    metadata: Mapping[str, str] | None = None,
    verify: bool = True,
    exporter: Exporter = "auto",
) -> ExportReport:
    """Export ``model`` (``[B, 3, H, W]`` normalised RGB -> ``[B, d]`` raw embedding) to ONNX.

    The model is deep-copied to CPU/float32/eval, so the caller's model keeps its device, train/eval mode
    and buffers. The graph is checked with ``onnx.checker`` (full check), annotated with the convention in
    ``metadata_props`` (``facedistill.*`` keys, then ``metadata`` which may override them, e.g. a nicer
    ``facedistill.model`` name), and written atomically: ``out_path`` is either the old file or the
    complete new one, never a partial export.

    Args:
        model: embedding network; DDP/DataParallel/``torch.compile`` wrappers are unwrapped.
        out_path: destination ``.onnx`` file; parent folders are created.
        input_size: ``(H, W)`` of the input.
        opset: ONNX opset, at least 17 (LayerNorm and friends as single ops).
        metadata: extra string key/values for ``metadata_props``.
        verify: compare onnxruntime against PyTorch on a fixed random batch of 4 (traced with 2, so a
            hard-coded batch size fails here) and report the max abs difference.
        exporter: ``"auto"`` uses the dynamo exporter when ``onnxscript`` is installed and falls back to
            the TorchScript exporter if it fails; ``"torchscript"`` / ``"dynamo"`` force one.

    Returns:
        :class:`ExportReport` with path, max abs diff (or None), actual opset and embedding size.
    """
    if opset < MIN_OPSET:
        raise ValueError(f"opset must be >= {MIN_OPSET}, got {opset}")
    h, w = (int(v) for v in input_size)
    if h <= 0 or w <= 0:
        raise ValueError(f"invalid input_size {input_size}")

    net = _cpu_eval_copy(model)
    gen = torch.Generator().manual_seed(0)
    dummy = torch.rand(_TRACE_BATCH, 3, h, w, generator=gen) * 2 - 1
    embedding_size = int(_embed(net, dummy).shape[1])

    meta = _metadata(model, h, w, embedding_size, metadata)

    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Same folder so the final rename is atomic; not mkstemp, whose 0600 mode would survive the rename.
    tmp = str(out.with_name(f".{out.name}.{uuid.uuid4().hex}.tmp"))
    try:
        how = _export_with_fallback(net, dummy, tmp, opset, exporter)
        actual_opset = _annotate_and_check(tmp, meta, opset)

        diff: float | None = None
        if verify:
            x = torch.rand(_VERIFY_BATCH, 3, h, w, generator=gen) * 2 - 1
            diff = _max_abs_diff(tmp, net, x)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise

    return ExportReport(
        path=out,
        max_abs_diff=diff,
        opset=int(actual_opset),
        embedding_size=embedding_size,
        input_size=(h, w),
        exporter=how,
        metadata=meta,
    )


def _metadata(model: nn.Module, h: int, w: int, embedding_size: int, extra: Mapping[str, str] | None) -> dict[str, str]:
    """The ``metadata_props`` of an export: facedistill's convention, then ``extra`` (which may override it)."""
    meta: dict[str, str] = {
        INPUT_METADATA: f"float32 NCHW {INPUT_COLOUR_ORDER} {h}x{w}, (x-{INPUT_MEAN:g})/{INPUT_STD:g}",
        # repr: the shortest text that reads back as the same float.
        PREPROCESSING_METADATA["colour_order"]: INPUT_COLOUR_ORDER,
        PREPROCESSING_METADATA["mean"]: repr(INPUT_MEAN),
        PREPROCESSING_METADATA["std"]: repr(INPUT_STD),
        f"{_META_PREFIX}output": "raw embedding, not L2-normalised",
        f"{_META_PREFIX}input_name": INPUT_NAME,
        f"{_META_PREFIX}output_name": OUTPUT_NAME,
        f"{_META_PREFIX}embedding_size": str(embedding_size),
        f"{_META_PREFIX}model": type(_unwrap(model)).__name__,
        f"{_META_PREFIX}version": __version__,
    }
    for k, v in (extra or {}).items():
        if not isinstance(k, str):
            raise TypeError(f"metadata keys must be str, got {k!r}")
        meta[k] = str(v)
    return meta


def _export_with_fallback(net: nn.Module, dummy: torch.Tensor, path: str, opset: int, exporter: Exporter) -> str:
    """Export with the chosen exporter; ``auto`` retries with TorchScript when dynamo fails. Returns the one used."""
    how = _resolve_exporter(exporter)
    try:
        _torch_export(net, dummy, path, opset, how)
    except Exception as err:
        if exporter != "auto" or how != "dynamo":
            raise
        warnings.warn(
            f"dynamo ONNX export failed ({type(err).__name__}: {err}); retrying with TorchScript",
            RuntimeWarning,
            stacklevel=3,
        )
        how = "torchscript"
        _torch_export(net, dummy, path, opset, how)
    return how


def _annotate_and_check(path: str, meta: Mapping[str, str], opset: int) -> int:
    """Write ``meta`` into the exported file's ``metadata_props``, check the graph fully (opset, a dynamic batch)
    and return its opset."""
    import onnx

    proto = onnx.load(path)
    kept = [p for p in proto.metadata_props if p.key not in meta]
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept)
    for k, v in meta.items():
        proto.metadata_props.add(key=k, value=v)
    onnx.checker.check_model(proto, full_check=True)
    actual_opset = max((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), default=opset)
    if actual_opset < MIN_OPSET:
        raise RuntimeError(f"exporter produced opset {actual_opset} < {MIN_OPSET}")
    batch_dim = proto.graph.input[0].type.tensor_type.shape.dim[0]
    if not batch_dim.dim_param:
        raise RuntimeError("exported input has a fixed batch dimension; expected a dynamic one")
    onnx.save(proto, path)
    return int(actual_opset)
