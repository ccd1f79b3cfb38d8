"""Dynamic int8 quantisation of facedistill ONNX models, and one embedder for every facedistill ONNX file.

What onnxruntime's ``quantize_dynamic`` does to a facedistill backbone (onnxruntime 1.32, counted on
MobileFaceNet, embedding 128, after :func:`quantize_dynamic_int8`'s pre-processing):

* pre-processing (``quant_pre_process``: shape inference plus onnxruntime's basic graph optimisations) drops the
  exporter's ``Identity`` nodes and folds the embedding ``BatchNorm1d`` into the final ``MatMul`` (a ``Gemm``),
  leaving ``Conv`` x 49, ``Gemm`` x 1, ``PRelu`` x 33, ``Add`` x 12, ``Flatten`` x 1;
* ``Conv`` becomes ``DynamicQuantizeLinear -> ConvInteger -> Cast -> Mul (scale) -> Add (bias)`` and ``Gemm`` /
  ``MatMul`` with a constant weight become ``MatMulInteger`` (the quantiser rewrites ``Gemm`` to ``MatMul`` first);
* weights are quantised once, per tensor by default; activations are quantised to uint8 at run time with a
  scale computed per tensor per call. ``PRelu``, ``Add`` and pooling stay float32.

Which weight type and which convolutions, measured on the development machine (AMD EPYC, AVX2 without
AVX-512/VNNI, ORT 1.32, 1 thread, the variants interleaved in one process while another job loaded both cores,
so read the ratios): per image at batch 1 / batch 32, fp32 26.6 / 20.0 ms; uint8 weights with depthwise
convolutions left float 27.5 / 24.8 ms; uint8 weights everywhere 52.4 / 33.0 ms; int8 weights without depthwise
72.6 / 48.9 ms; int8 weights everywhere 157 / 88 ms. ``ConvInteger`` accepts both weight types on the CPU
provider, but without VNNI its int8-weight path is several times slower than the uint8 one, and a depthwise
convolution pays the per-call activation quantisation for almost no arithmetic. Hence the defaults
``weight_type="quint8"`` and ``exclude_depthwise=True``: depthwise kernels are ~6 % of MobileFaceNet's weights,
so keeping them float costs ~0.13 MB of a file that shrinks from 3.95 to 1.26 MB, and it avoids per-tensor
quantisation of depthwise filters, the usual source of MobileNet-style int8 accuracy loss. On such a CPU dynamic
int8 is a size win at about fp32 speed, not a speed win; on a VNNI CPU ``"qint8"`` may be faster. Measure on the
deployment CPU with ``benchmarks/latency.py`` (``facedistill.export.latency``).
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx
import torch

from facedistill.data.images import normalise
from facedistill.eval.verify import Embedder
from facedistill.export.onnx import read_onnx_metadata

__all__ = [
    "QUANTIZATION_KEY",
    "OnnxConvention",
    "count_op_types",
    "onnx_embedder",
    "quantize_dynamic_int8",
    "read_onnx_convention",
    "read_quantization_info",
]

QUANTIZATION_KEY = "facedistill.quantization"
_REQUIRED_KEYS = ("facedistill.input", "facedistill.input_name", "facedistill.output_name")
_INPUT_RE = re.compile(
    r"^float32 NCHW RGB (?P<h>\d+)x(?P<w>\d+), \(x-(?P<mean>[0-9.]+)\)/(?P<std>[0-9.]+)$",
)
_INTEGER_OPS = ("ConvInteger", "MatMulInteger", "DynamicQuantizeMatMul", "QLinearConv", "QLinearMatMul")
_FLOAT_COMPUTE_OPS = ("Conv", "MatMul", "Gemm")

WeightType = Literal["quint8", "qint8"]


@dataclass(frozen=True)
class OnnxConvention:
    """The I/O convention a facedistill ONNX file declares in its ``metadata_props``."""

    input_name: str
    output_name: str
    input_size: tuple[int, int]  # (H, W)
    mean: float
    std: float
    quantization: dict[str, Any] | None

    @property
    def precision(self) -> str:
        return "int8" if self.quantization else "fp32"


def _load_metadata(path: Path) -> dict[str, str]:
    if not path.is_file():
        raise FileNotFoundError(f"ONNX model not found: {path}")
    return read_onnx_metadata(path)


def read_onnx_convention(onnx_path: str | os.PathLike[str]) -> OnnxConvention:
    """Parse the facedistill convention of an ONNX file; a file without it is refused with a ValueError.

    Foreign models do not say how their input is normalised, and guessing would silently give wrong embeddings;
    they belong in :class:`facedistill.teachers.onnx_teacher.OnnxTeacher`, which takes the preprocessing
    explicitly.
    """
    path = Path(onnx_path)
    meta = _load_metadata(path)
    missing = [key for key in _REQUIRED_KEYS if key not in meta]
    if missing:
        raise ValueError(
            f"{path} is not a facedistill ONNX model: its metadata lacks {', '.join(missing)}. Export it with "
            "`facedistill export` (facedistill.export.onnx.export_onnx), or evaluate a foreign model as a teacher "
            "(OnnxTeacher with explicit preprocessing)"
        )
    match = _INPUT_RE.match(meta["facedistill.input"])
    if match is None:
        raise ValueError(
            f"{path}: unrecognised facedistill.input convention {meta['facedistill.input']!r}; expected e.g. "
            "'float32 NCHW RGB 112x112, (x-127.5)/127.5'"
        )
    quantization = None
    if QUANTIZATION_KEY in meta:
        try:
            quantization = json.loads(meta[QUANTIZATION_KEY])
        except json.JSONDecodeError:
            quantization = {"description": meta[QUANTIZATION_KEY]}
    return OnnxConvention(
        input_name=meta["facedistill.input_name"],
        output_name=meta["facedistill.output_name"],
        input_size=(int(match["h"]), int(match["w"])),
        mean=float(match["mean"]),
        std=float(match["std"]),
        quantization=quantization,
    )


def read_quantization_info(onnx_path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The ``facedistill.quantization`` record of a quantised model, or None for a float model."""
    return read_onnx_convention(onnx_path).quantization


def count_op_types(model: str | os.PathLike[str] | onnx.ModelProto) -> dict[str, int]:
    """Node count per op type of the main graph, most frequent first."""
    proto = model if isinstance(model, onnx.ModelProto) else onnx.load(str(model), load_external_data=False)
    return dict(Counter(node.op_type for node in proto.graph.node).most_common())


def _depthwise_conv_names(proto: onnx.ModelProto) -> list[str]:
    """Names of Conv nodes with one input channel per group (group > 1 and weight dim 1 == 1)."""
    weights = {init.name: tuple(init.dims) for init in proto.graph.initializer}
    names = []
    for node in proto.graph.node:
        if node.op_type != "Conv":
            continue
        group = next((attr.i for attr in node.attribute if attr.name == "group"), 1)
        shape = weights.get(node.input[1]) if len(node.input) > 1 else None
        if group > 1 and shape is not None and len(shape) == 4 and shape[1] == 1:
            names.append(node.name)
    return names


def _ensure_node_names(proto: onnx.ModelProto) -> None:
    # nodes_to_exclude matches by name; the exporters name every node, but a hand-made graph may not.
    used = {node.name for node in proto.graph.node if node.name}
    for index, node in enumerate(proto.graph.node):
        if not node.name:
            name = f"{node.op_type}_{index}"
            while name in used:
                name += "_"
            node.name = name
            used.add(name)


def _session(path: str | os.PathLike[str], intra_op_threads: int | None, providers: Sequence[str] | None):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # initialiser/quantisation chatter is noise for users of the embeddings
    if intra_op_threads is not None:
        if intra_op_threads < 1:
            raise ValueError(f"intra_op_threads must be >= 1, got {intra_op_threads}")
        opts.intra_op_num_threads = int(intra_op_threads)
    return ort.InferenceSession(str(path), sess_options=opts, providers=list(providers or ["CPUExecutionProvider"]))


def _min_cosine(fp32_path: Path, int8_path: Path, convention: OnnxConvention) -> float:
    x = np.random.default_rng(0).uniform(-1.0, 1.0, size=(4, 3, *convention.input_size)).astype(np.float32)
    feeds = {convention.input_name: x}
    ref = _session(fp32_path, None, None).run([convention.output_name], feeds)[0].astype(np.float64)
    got = _session(int8_path, None, None).run([convention.output_name], feeds)[0].astype(np.float64)
    cos = (ref * got).sum(1) / np.maximum(np.linalg.norm(ref, axis=1) * np.linalg.norm(got, axis=1), 1e-12)
    return float(cos.min())


def quantize_dynamic_int8(
    onnx_in: str | os.PathLike[str],
    onnx_out: str | os.PathLike[str],
    weight_type: WeightType = "quint8",
    per_channel: bool = False,
    exclude_depthwise: bool = True,
    verify: bool = True,
) -> Path:
    """Quantise a facedistill fp32 ONNX model to dynamic int8 (8-bit weights, uint8 activations at run time).

    The model is pre-processed (shape inference, onnxruntime basic optimisations that fold the embedding
    BatchNorm into the last MatMul), then quantised with ``onnxruntime.quantization.quantize_dynamic``. The
    facedistill metadata of ``onnx_in`` is copied and ``facedistill.quantization`` added: a JSON record of the
    settings, the onnxruntime version, the op counts of the float graph the quantiser saw, which integer ops it
    produced and which compute ops stayed float, the source file's size, and (with ``verify``) the minimum
    cosine between the fp32 and int8 embeddings of 4 fixed random inputs -- a smoke test for a broken graph, not
    an accuracy estimate (evaluate on real pairs with :func:`onnx_embedder` and ``evaluate_pairs`` for that).
    See the module docstring for why the defaults are uint8 weights and float depthwise convolutions. The
    output is written atomically; ``onnx_in`` must be a facedistill model that is not already quantised.

    Args:
        onnx_in: fp32 model written by ``export_onnx``.
        onnx_out: destination; must differ from ``onnx_in``.
        weight_type: ``"quint8"`` (U8U8 kernels) or ``"qint8"`` (U8S8 kernels).
        per_channel: one weight scale per output channel instead of per tensor.
        exclude_depthwise: leave depthwise convolutions in float32.
        verify: record the random-input cosine check.

    Returns:
        ``onnx_out`` as a Path.
    """
    import onnxruntime
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    src, out = Path(onnx_in), Path(onnx_out)
    if weight_type not in ("quint8", "qint8"):
        raise ValueError(f"weight_type must be 'quint8' or 'qint8', got {weight_type!r}")
    if src.resolve() == out.resolve():
        raise ValueError(f"onnx_out must differ from onnx_in ({src}); the fp32 model is the reference")
    convention = read_onnx_convention(src)
    if convention.quantization is not None:
        raise ValueError(f"{src} is already quantised ({QUANTIZATION_KEY} is set)")
    source_meta = _load_metadata(src)

    out.parent.mkdir(parents=True, exist_ok=True)
    # Intermediates beside the output, not in /tmp: a large backbone's copies may not fit a small tmpfs.
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as work:
        pre = Path(work) / "pre.onnx"
        quant = Path(work) / "quant.onnx"
        quant_pre_process(str(src), str(pre))
        proto = onnx.load(str(pre))
        _ensure_node_names(proto)
        float_ops = count_op_types(proto)
        excluded = _depthwise_conv_names(proto) if exclude_depthwise else []
        onnx.save(proto, str(pre))
        quantize_dynamic(
            str(pre),
            str(quant),
            per_channel=per_channel,
            weight_type=QuantType.QUInt8 if weight_type == "quint8" else QuantType.QInt8,
            nodes_to_exclude=excluded,
        )

        int8_ops = count_op_types(quant)
        record: dict[str, Any] = {
            "method": "onnxruntime.quantization.quantize_dynamic",
            "onnxruntime": onnxruntime.__version__,
            "weight_type": weight_type,
            "per_channel": per_channel,
            "activations": "uint8, dynamic per-tensor scale per call",
            "excluded_depthwise_convs": len(excluded),
            "quantized_ops": {op: n for op, n in int8_ops.items() if op in _INTEGER_OPS},
            "float_compute_ops": {op: n for op, n in int8_ops.items() if op in _FLOAT_COMPUTE_OPS},
            "float_graph_ops": float_ops,
            "source": src.name,
            "source_bytes": src.stat().st_size,
        }
        if verify:
            record["cosine_vs_fp32_random_min"] = round(_min_cosine(src, quant, convention), 6)

        _write_quantized(quant, out, source_meta, record)
    return out


def _write_quantized(quant: Path, out: Path, source_meta: dict[str, str], record: dict[str, Any]) -> None:
    """``quant`` with the source's facedistill metadata and the quantisation record, checked, written atomically
    to ``out``."""
    proto = onnx.load(str(quant))
    # The quantiser keeps most metadata, but copying explicitly does not depend on that, and drops whatever it may
    # have added under our prefix.
    kept = [p for p in proto.metadata_props if p.key not in source_meta and not p.key.startswith("facedistill.")]
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept)
    for key, value in source_meta.items():
        proto.metadata_props.add(key=key, value=value)
    proto.metadata_props.add(key=QUANTIZATION_KEY, value=json.dumps(record, sort_keys=True))
    onnx.checker.check_model(proto)
    tmp = out.with_name(f".{out.name}.{uuid.uuid4().hex}.tmp")
    try:
        onnx.save(proto, str(tmp))
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def onnx_embedder(
    path: str | os.PathLike[str],
    intra_op_threads: int | None = None,
    providers: Sequence[str] | None = None,
) -> Embedder:
    """An :data:`~facedistill.eval.verify.Embedder` running a facedistill ONNX model (fp32 or int8) in onnxruntime.

    uint8 RGB ``[B, 3, H, W]`` -> the normalisation declared in the model's metadata -> raw embeddings
    ``[B, d]`` float32 on CPU, the same contract as ``student_embedder``, so exported and quantised models go
    through the same ``evaluate_pairs`` as the PyTorch student. Files without facedistill metadata are refused
    (see :func:`read_onnx_convention`). ``providers`` defaults to the CPU provider.
    """
    convention = read_onnx_convention(path)
    session = _session(path, intra_op_threads, providers)
    h, w = convention.input_size

    def embed(images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8:
            raise TypeError(f"expected uint8 RGB images, got {images.dtype}")
        if images.ndim != 4 or tuple(images.shape[1:]) != (3, h, w):
            raise ValueError(f"expected images of shape [B, 3, {h}, {w}], got {tuple(images.shape)}")
        if convention.mean == 127.5 and convention.std == 127.5:
            # The very same arithmetic as student_embedder, so fp32 ONNX and PyTorch agree to float rounding.
            batch = normalise(images.cpu())
        else:
            batch = images.cpu().float().sub_(convention.mean).div_(convention.std)
        out = session.run([convention.output_name], {convention.input_name: np.ascontiguousarray(batch.numpy())})[0]
        return torch.from_numpy(np.asarray(out, dtype=np.float32))

    return embed
