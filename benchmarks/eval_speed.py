"""Speed of the LFW protocol for a student: the chunked evaluation path against the reference path.

    python benchmarks/eval_speed.py --checkpoint runs/md/last.pt

Both paths are ``facedistill.eval.verify.evaluate_pairs`` on the full LFW View 2 protocol (6000 pairs, every
distinct image once plus its mirror, 10 folds). The reference runs each loader batch (256 images + 256 mirrors)
through the model at once, as the evaluation did before; the default path splits it into chunks of 16 on CPU.
Prints the wall time of each, their ratio, and checks that the accuracy is identical and the scores agree.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from facedistill.eval.verify import evaluate_pairs, load_pairs_set, student_embedder
from facedistill.models.complexity import count_macs
from facedistill.train.checkpoint import load_student

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True, help="a facedistill last.pt / best.pt")
    parser.add_argument("--pairs", type=Path, default=SHARED / "lfw_pairs.txt")
    parser.add_argument("--images", type=Path, default=SHARED / "lfw")
    parser.add_argument("--chunk-size", type=int, default=16)
    parser.add_argument("--skip-reference", action="store_true", help="time the default path only")
    parser.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    args = parser.parse_args(argv)

    pairs_set = load_pairs_set(args.pairs, args.images, name="lfw")
    model, config = load_student(args.checkpoint)
    distinct = len(set(pairs_set.pairs.left) | set(pairs_set.pairs.right))
    forwards = 2 * distinct  # flip test
    macs = count_macs(model)
    report: dict = {
        "checkpoint": str(args.checkpoint),
        "model": config["model"],
        "distinct_images": distinct,
        "forward_passes": forwards,
        "threads": torch.get_num_threads(),
    }
    paths = {"chunked": args.chunk_size} if args.skip_reference else {"chunked": args.chunk_size, "reference": 1 << 30}
    scores = {}
    for name, chunk in paths.items():
        started = time.perf_counter()
        result, scores[name] = evaluate_pairs(student_embedder(model, chunk_size=chunk), pairs_set, progress=False)
        seconds = time.perf_counter() - started
        report[name] = {
            "seconds": seconds,
            "images_per_second": forwards / seconds,
            "effective_gmacs_per_second": forwards * macs / seconds / 1e9,
            "accuracy_mean": result.accuracy_mean,
            "accuracy_std": result.accuracy_std,
            "tar_at_far": {str(k): v for k, v in result.tar_at_far.items()},
        }
        print(
            f"{name:10s} {seconds:7.1f} s  {forwards / seconds:6.1f} img/s  "
            f"{forwards * macs / seconds / 1e9:5.1f} GMAC/s  LFW {result.summary()}"
        )
    if "reference" in report:
        report["speedup"] = report["reference"]["seconds"] / report["chunked"]["seconds"]
        report["max_abs_score_difference"] = float(np.abs(scores["chunked"] - scores["reference"]).max())
        report["identical_accuracy"] = report["chunked"]["accuracy_mean"] == report["reference"]["accuracy_mean"]
        print(
            f"speed-up x{report['speedup']:.2f}; max |score difference| {report['max_abs_score_difference']:.2e}; "
            f"identical accuracy: {report['identical_accuracy']}"
        )
    # What 45 s would take: every forward's multiply-accumulates within the budget.
    report["gmacs_per_second_needed_for_45s"] = forwards * macs / 45 / 1e9
    print(f"45 s for this protocol needs {report['gmacs_per_second_needed_for_45s']:.1f} GMAC/s sustained")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
