"""CPU deployment benchmark: PyTorch fp32 vs onnxruntime fp32 vs onnxruntime dynamic int8 of one student.

Takes a facedistill checkpoint, or builds an untrained backbone (weights do not change the timing), exports it
to fp32 ONNX, quantises that to int8, and prints per-image latency at batch 1 (median, p90) and throughput at
batch 32 for the three, measured interleaved over a few rounds (``compare_latency``), with params/MACs and what
the quantiser turned into integer ops. With ``--pairs`` (LFW ``pairs.txt`` plus ``--images``, a ``.bin`` pack
or a TSV) it also evaluates the fp32 and int8 ONNX models through the same ``evaluate_pairs`` and prints the
accuracy change.

    python benchmarks/latency.py                                   # untrained mobilefacenet, embedding 128
    python benchmarks/latency.py --checkpoint runs/md/last.pt --pairs lfw_pairs.txt --images lfw --out lat.json

Timings depend on the CPU and its load: compare rows of one run, not numbers across machines or busy periods.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from facedistill.export.latency import compare_latency, latency_report_markdown
from facedistill.export.onnx import export_onnx
from facedistill.export.quantize import onnx_embedder, quantize_dynamic_int8, read_quantization_info
from facedistill.models import count_macs, count_parameters, create_model, format_count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, help="facedistill checkpoint (last.pt / best.pt)")
    parser.add_argument("--model", default="mobilefacenet", help="backbone to build when no checkpoint is given")
    parser.add_argument("--embedding-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads (default: torch's)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=10, help="timed calls per batch size per round")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; statistics are their medians")
    parser.add_argument("--weight-type", choices=["quint8", "qint8"], default="quint8")
    parser.add_argument("--per-channel", action="store_true")
    parser.add_argument("--quantize-depthwise", action="store_true", help="also quantise depthwise convolutions")
    parser.add_argument("--pairs", type=Path, help="LFW pairs.txt, .bin pack or pairs TSV")
    parser.add_argument("--images", type=Path, help="image root of --pairs")
    parser.add_argument("--eval-batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, help="write all results as JSON here")
    args = parser.parse_args()

    started = time.perf_counter()
    if args.checkpoint is not None:
        from facedistill.train.checkpoint import load_student

        model, config = load_student(args.checkpoint)
        name, method = config["model"]["name"], config["method"]["name"]
        source = str(args.checkpoint)
    else:
        torch.manual_seed(0)
        model = create_model(args.model, embedding_size=args.embedding_size).eval()
        name, method, source = args.model, "untrained", f"untrained {args.model}"
    embedding_size = int(model.embedding_size)
    params, macs = count_parameters(model), count_macs(model)

    report: dict = {
        "model": {"source": source, "name": name, "embedding_size": embedding_size, "params": params, "macs": macs},
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
        },
        "command": "python " + " ".join(sys.argv),
    }
    with tempfile.TemporaryDirectory(prefix="facedistill-latency-") as work:
        fp32_path = Path(work) / "model.onnx"
        int8_path = Path(work) / "model.int8.onnx"
        export = export_onnx(model, fp32_path, metadata={"facedistill.model": name, "facedistill.method": method})
        quantize_dynamic_int8(
            fp32_path,
            int8_path,
            weight_type=args.weight_type,
            per_channel=args.per_channel,
            exclude_depthwise=not args.quantize_depthwise,
        )
        quantization = read_quantization_info(int8_path)
        report["export_max_abs_diff"] = export.max_abs_diff
        report["quantization"] = quantization
        print(
            f"{source}: {name}, embedding {embedding_size}, params {format_count(params)}, "
            f"MACs {format_count(macs)} at 112x112; export max abs diff {export.max_abs_diff:.1e}"
        )
        print(
            f"int8 ({quantization['weight_type']} weights, per-channel {quantization['per_channel']}): integer ops "
            f"{quantization['quantized_ops']}, float compute ops left {quantization['float_compute_ops'] or '{}'}, "
            f"{quantization['source_bytes'] / 1e6:.2f} MB -> {int8_path.stat().st_size / 1e6:.2f} MB, "
            f"min cosine to fp32 on random inputs {quantization.get('cosine_vs_fp32_random_min')}",
            flush=True,
        )

        results = compare_latency(
            {"PyTorch fp32": model, "ORT fp32": fp32_path, "ORT int8 (dynamic)": int8_path},
            rounds=args.rounds,
            batch_sizes=args.batch_sizes,
            warmup=args.warmup,
            repeats=args.repeats,
            threads=args.threads,
        )
        report["latency"] = results
        print(
            f"\nthreads {results[0]['threads']}, {args.rounds} interleaved rounds x {args.repeats} timed calls "
            f"(after {args.warmup} warm-up calls) per batch size; medians over rounds\n"
        )
        print(latency_report_markdown(results), flush=True)

        if args.pairs is not None:
            import onnxruntime

            from facedistill.eval.verify import evaluate_pairs, load_pairs_set

            pairs_set = load_pairs_set(args.pairs, args.images)
            accuracy: dict = {}
            scores = {}
            for label, path in (("ORT fp32", fp32_path), ("ORT int8", int8_path)):
                result, scores[label] = evaluate_pairs(
                    onnx_embedder(path, intra_op_threads=args.threads),
                    pairs_set,
                    batch_size=args.eval_batch_size,
                    num_workers=args.workers,
                )
                accuracy[label] = result.to_dict(include_roc=False) | {"summary": result.summary()}
            accuracy["delta_accuracy_points"] = 100.0 * (
                accuracy["ORT int8"]["accuracy_mean"] - accuracy["ORT fp32"]["accuracy_mean"]
            )
            accuracy["score_max_abs_diff"] = float(abs(scores["ORT int8"] - scores["ORT fp32"]).max())
            accuracy["pairs_set"] = pairs_set.name
            accuracy["onnxruntime"] = onnxruntime.__version__
            report["accuracy"] = accuracy

    if "accuracy" in report:
        acc = report["accuracy"]
        print(
            f"\n{acc['pairs_set']}: fp32 {acc['ORT fp32']['summary']}, int8 {acc['ORT int8']['summary']}, "
            f"change {acc['delta_accuracy_points']:+.2f} points; pair cosine scores differ by at most "
            f"{acc['score_max_abs_diff']:.2e}"
        )
    report["total_wall_seconds"] = time.perf_counter() - started
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))
        print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
