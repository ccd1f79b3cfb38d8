"""The CPU protocol: SFace teacher, CelebA-299 training set, MobileFaceNet students, LFW 6000 pairs.

Trains an ArcFace student and a MarginDistillation student with the same recipe (the one ``facedistill demo``
uses on real data), evaluates them and the teacher on LFW (10 folds, flip test), and measures, in the same run,
the step throughput of MarginDistillation (cached teacher) against plain ArcFace on identical data.

    python benchmarks/cpu_protocol.py --epochs 12 --out bench_out/cpu_protocol

Prints the table and writes ``results.json`` / ``results.md`` / ``roc_all.png`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from facedistill.config import Config, from_dict
from facedistill.demo import student_methods, student_recipe
from facedistill.pipeline import compare_methods, markdown_table
from facedistill.teachers import create_teacher
from facedistill.train.loop import train

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def step_throughput_ratio(
    out: Path, data: Path, cache: Path, recipe: dict, methods: dict, steps: int, rounds: int
) -> dict:
    """Images/s of each method's training step on identical data, interleaved (A B A B ...) so that background
    load affects both alike; returns the medians and their ratio."""
    speeds: dict[str, list[float]] = {name: [] for name in methods}
    for round_index in range(rounds):
        for name, overrides in methods.items():
            data_cfg = json.loads(json.dumps(recipe))
            data_cfg.update(overrides)
            data_cfg["run"] = {"seed": 0, "output_dir": str(out / f"throughput_{name}_{round_index}")}
            data_cfg["data"] = {**recipe["data"], "train": str(data)}
            data_cfg["teacher"] = {"cache": str(cache)}
            data_cfg["train"] = {
                **recipe["train"],
                "max_steps": steps,
                "export_onnx": False,
                "checkpoint_every": 10**9,
            }
            summary = train(from_dict(Config, data_cfg), progress=False)
            speeds[name].append(summary.images_per_second)
            print(f"throughput round {round_index} {name}: {summary.images_per_second:.1f} img/s")
    medians = {name: statistics.median(values) for name, values in speeds.items()}
    ratio = medians["margin_distillation"] / medians["arcface"]
    return {
        "images_per_second": speeds,
        "median": medians,
        "ratio_md_over_arcface": ratio,
        "steps": steps,
        "rounds": rounds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=SHARED / "celeba299")
    parser.add_argument("--pairs", type=Path, default=SHARED / "lfw_pairs.txt")
    parser.add_argument("--images", type=Path, default=SHARED / "lfw")
    parser.add_argument("--teacher", default="sface")
    parser.add_argument("--epochs", type=float, default=12.0)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--methods", nargs="+", default=["arcface", "margin_distillation"])
    parser.add_argument("--throughput-steps", type=int, default=10)
    parser.add_argument("--throughput-rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("bench_out/cpu_protocol"))
    args = parser.parse_args()

    started = time.perf_counter()
    teacher = create_teacher(args.teacher)
    recipe = student_recipe(args.epochs, args.batch_size, teacher.embedding_size)
    methods = {name: spec for name, spec in student_methods(32.0).items() if name in args.methods}
    rows, report = compare_methods(args.out, args.data, teacher, args.pairs, args.images, methods, recipe)
    if {"arcface", "margin_distillation"} <= set(methods):
        report["step_throughput"] = step_throughput_ratio(
            args.out,
            args.data,
            args.out / "teacher_cache",
            recipe,
            methods,
            args.throughput_steps,
            args.throughput_rounds,
        )
    report["machine"] = {
        "platform": platform.platform(),
        "processor": platform.processor(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    report["command"] = "python benchmarks/cpu_protocol.py " + " ".join(
        f"--{key.replace('_', '-')} {' '.join(map(str, value)) if isinstance(value, list) else value}"
        for key, value in vars(args).items()
    )
    report["total_wall_seconds"] = time.perf_counter() - started
    (args.out / "results.json").write_text(json.dumps(report, indent=2, default=str))
    print("\n" + markdown_table(rows, "LFW"))
    if "step_throughput" in report:
        ratio = report["step_throughput"]["ratio_md_over_arcface"]
        print(f"\nMarginDistillation / ArcFace step throughput: {ratio:.3f} (target >= 0.97)")
    print(f"total wall time {report['total_wall_seconds']:.0f} s; results in {args.out}")


if __name__ == "__main__":
    main()
