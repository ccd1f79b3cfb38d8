"""CPU latency and throughput of an embedding model: PyTorch fp32 and onnxruntime fp32 / int8, measured alike.

What is timed is one forward call of the network on an already normalised float32 batch (decoding, alignment
and normalisation are not included), after ``warmup`` untimed calls, ``repeats`` times per batch size:

* ``ms_per_image_median`` / ``ms_per_image_p90``: wall time of one call divided by the batch size, median and
  90th percentile over the repeats (at batch 1 this is the latency a single request sees);
* ``images_per_second``: batch size divided by the median call time (the throughput of batched serving).

PyTorch runs a CPU float32 eval copy of the model in ``channels_last`` under ``torch.inference_mode``;
onnxruntime runs the CPU provider with its default (full) graph optimisation. Both use the same number of intra-op
threads (``threads``, default ``torch.get_num_threads()``) so the backends are compared on equal terms.
Timings are only comparable when taken on the same machine under the same load; :func:`compare_latency`
interleaves several models over a few rounds so that a load that drifts during the measurement (another job
starting or ending) affects all of them alike instead of favouring whichever ran last.

Ask for no more threads than there are idle cores. When other processes compete for the cores, PyTorch's
OpenMP threads wait at every operator's barrier for a descheduled partner: on the 2-core development machine,
with a training job in the background, MobileFaceNet at batch 1 took 25 ms per image with 1 thread and between
55 ms and 1.4 s with 2 threads, from one run to the next; onnxruntime suffered far less.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = ["compare_latency", "latency_report_markdown", "measure_latency"]


def _time_calls(run: Callable[[], object], warmup: int, repeats: int) -> np.ndarray:
    for _ in range(warmup):
        run()
    seconds = np.empty(repeats)
    for i in range(repeats):
        start = time.perf_counter()
        run()
        seconds[i] = time.perf_counter() - start
    return seconds


def _stats(seconds: np.ndarray, batch_size: int) -> dict[str, float]:
    per_image_ms = seconds * 1e3 / batch_size
    return {
        "ms_per_image_median": float(np.median(per_image_ms)),
        "ms_per_image_p90": float(np.percentile(per_image_ms, 90)),
        "images_per_second": float(batch_size / np.median(seconds)),
    }


def _inputs(batch_size: int, size: tuple[int, int]) -> np.ndarray:
    # Values in the normalised input range, fixed seed: every backend times the very same batch.
    return np.random.default_rng(0).uniform(-1.0, 1.0, size=(batch_size, 3, *size)).astype(np.float32)


def _torch_runner(model: nn.Module, input_size: tuple[int, int]) -> tuple[Callable[[int], Callable[[], object]], int]:
    from facedistill.export.onnx import _cpu_eval_copy

    net = _cpu_eval_copy(model).to(memory_format=torch.channels_last)
    size = sum(t.numel() * t.element_size() for t in [*net.parameters(), *net.buffers()])

    def runner(batch_size: int) -> Callable[[], object]:
        x = torch.from_numpy(_inputs(batch_size, input_size)).contiguous(memory_format=torch.channels_last)

        @torch.inference_mode()
        def run() -> object:
            return net(x)

        return run

    return runner, size


def _ort_runner(path: Path, threads: int) -> tuple[Callable[[int], Callable[[], object]], Any]:
    import onnxruntime as ort

    from facedistill.export.quantize import read_onnx_convention

    convention = read_onnx_convention(path)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])

    def runner(batch_size: int) -> Callable[[], object]:
        feeds = {convention.input_name: _inputs(batch_size, convention.input_size)}
        return lambda: session.run([convention.output_name], feeds)

    return runner, convention


def measure_latency(
    model_or_onnx_path: nn.Module | str | os.PathLike[str],
    batch_sizes: Sequence[int] = (1, 32),
    warmup: int = 3,
    repeats: int = 20,
    threads: int | None = None,
    input_size: tuple[int, int] = (112, 112),
    label: str | None = None,
) -> dict[str, Any]:
    """Time a PyTorch model or a facedistill ONNX file (fp32 or int8) on CPU; see the module docstring.

    Args:
        model_or_onnx_path: an ``nn.Module`` (copied; the caller's model is untouched) or the path of an ONNX
            file written by ``export_onnx`` / ``quantize_dynamic_int8`` (its input size comes from its metadata).
        batch_sizes: batch sizes to time.
        warmup: untimed calls before each batch size.
        repeats: timed calls per batch size.
        threads: intra-op threads for both backends; ``None`` uses ``torch.get_num_threads()``.
        input_size: ``(H, W)`` for a PyTorch model.
        label: row name for :func:`latency_report_markdown`; defaults to backend and precision.

    Returns:
        A JSON-serialisable dict: ``label``, ``backend`` (``"pytorch"`` / ``"onnxruntime"``), ``precision``
        (``"fp32"`` / ``"int8"``), ``threads``, ``warmup``, ``repeats``, ``input_size``, ``model_bytes`` (file size,
        or parameter + buffer bytes for PyTorch), ``path`` and ``batches``: ``{str(batch_size): {batch_size,
        ms_per_image_median, ms_per_image_p90, images_per_second}}``.
    """
    if warmup < 0 or repeats < 1:
        raise ValueError(f"need warmup >= 0 and repeats >= 1, got warmup={warmup}, repeats={repeats}")
    sizes = [int(b) for b in batch_sizes]
    if not sizes or min(sizes) < 1:
        raise ValueError(f"batch sizes must be positive, got {list(batch_sizes)}")
    n_threads = int(threads) if threads is not None else torch.get_num_threads()
    if n_threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")

    previous_threads = torch.get_num_threads()
    try:
        torch.set_num_threads(n_threads)
        if isinstance(model_or_onnx_path, nn.Module):
            runner, model_bytes = _torch_runner(model_or_onnx_path, (int(input_size[0]), int(input_size[1])))
            backend, precision, path, size = "pytorch", "fp32", None, tuple(int(v) for v in input_size)
        else:
            path = Path(model_or_onnx_path)
            runner, convention = _ort_runner(path, n_threads)
            backend, precision, size = "onnxruntime", convention.precision, convention.input_size
            model_bytes = path.stat().st_size
        batches: dict[str, dict[str, float]] = {}
        for batch_size in sizes:
            seconds = _time_calls(runner(batch_size), warmup, repeats)
            batches[str(batch_size)] = {"batch_size": batch_size, **_stats(seconds, batch_size)}
    finally:
        torch.set_num_threads(previous_threads)

    return {
        "label": label or f"{'PyTorch' if backend == 'pytorch' else 'ORT'} {precision}",
        "backend": backend,
        "precision": precision,
        "threads": n_threads,
        "warmup": warmup,
        "repeats": repeats,
        "input_size": list(size),
        "model_bytes": int(model_bytes),
        "path": str(path) if path is not None else None,
        "batches": batches,
    }


def compare_latency(
    candidates: Mapping[str, nn.Module | str | os.PathLike[str]],
    rounds: int = 3,
    batch_sizes: Sequence[int] = (1, 32),
    warmup: int = 3,
    repeats: int = 10,
    threads: int | None = None,
    input_size: tuple[int, int] = (112, 112),
) -> list[dict[str, Any]]:
    """:func:`measure_latency` of several models (label -> model or ONNX path), interleaved over ``rounds``.

    Each round measures every candidate once, starting one candidate later than the previous round so no model
    always runs first or last. Every statistic is the median over the rounds (``repeats`` timed calls each); the
    result also holds ``rounds`` and the per-round results under ``"per_round"``. Returns one result per
    candidate, in the given order.
    """
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    labels = list(candidates)
    if not labels:
        raise ValueError("no models to compare")
    per_label: dict[str, list[dict[str, Any]]] = {label: [] for label in labels}
    for r in range(rounds):
        shift = r % len(labels)
        for label in labels[shift:] + labels[:shift]:
            per_label[label].append(
                measure_latency(candidates[label], batch_sizes, warmup, repeats, threads, input_size, label)
            )
    combined = []
    for label in labels:
        runs = per_label[label]
        batches = {}
        for b, first in runs[0]["batches"].items():
            batches[b] = {"batch_size": first["batch_size"]}
            for key in ("ms_per_image_median", "ms_per_image_p90", "images_per_second"):
                batches[b][key] = float(np.median([run["batches"][b][key] for run in runs]))
        combined.append({**runs[0], "rounds": rounds, "batches": batches, "per_round": runs})
    return combined


def _format_bytes(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def latency_report_markdown(results: Mapping[str, Mapping[str, Any]] | Iterable[Mapping[str, Any]]) -> str:
    """A markdown table of :func:`measure_latency` results (a list of them, or a mapping label -> result).

    Columns: per-image latency (median and p90) at the smallest batch size, and images/s at every larger batch
    size, plus backend, precision, threads and model size. Speed-ups are relative to the first row.
    """
    rows = [dict(r, label=label) for label, r in results.items()] if isinstance(results, Mapping) else list(results)
    if not rows:
        raise ValueError("no latency results to report")
    all_sizes = sorted({int(b) for r in rows for b in r["batches"]})
    small, large = all_sizes[0], all_sizes[1:]
    header = [
        "model",
        "backend",
        "precision",
        "threads",
        "size",
        f"batch {small}: ms/img median",
        f"batch {small}: ms/img p90",
        *(f"batch {b}: img/s" for b in large),
        f"speed-up at batch {small}",
    ]
    base = rows[0]["batches"].get(str(small), {}).get("ms_per_image_median")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        first = r["batches"].get(str(small))
        cells = [
            str(r.get("label", "")),
            str(r.get("backend", "")),
            str(r.get("precision", "")),
            str(r.get("threads", "")),
            _format_bytes(int(r["model_bytes"])) if r.get("model_bytes") else "-",
            f"{first['ms_per_image_median']:.2f}" if first else "-",
            f"{first['ms_per_image_p90']:.2f}" if first else "-",
        ]
        for b in large:
            stats = r["batches"].get(str(b))
            cells.append(f"{stats['images_per_second']:.1f}" if stats else "-")
        cells.append(f"{base / first['ms_per_image_median']:.2f}x" if first and base else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
