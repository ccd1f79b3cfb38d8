"""The teacher cache against a training epoch, per image, both run by an arcface_torch user on this machine.

On a patched copy of ../shared/upstream/arcface_torch, with the first ``--identities`` identities of the CPU
protocol's training split packed as ``data/cache_bench``, interleaved rounds (cache, train, cache, train ...) of

    cache  torchrun --nproc_per_node N -m facedistill.cli arcface-torch cache-teacher RECIPE --overwrite
           (the SFace teacher; wall time of the whole command, start-up included: what the user waits for)
    train  torchrun --nproc_per_node N train_v2.py RECIPE, the validated MarginDistillation recipe reading that
           cache; the framework's own "Speed" readings (``config.frequent`` steps each, the first one dropped)

Prints both rates in images per second (a cached image is embedded twice: itself and its mirror) and their ratio;
``--results`` saves them as JSON. ``--cache-nproc 1 2`` times only the cache, at each process count in turn
within every round (1, 2, 1, 2 ...), to choose how many processes a CPU host should embed with. Run it on a quiet
machine; for a before/after comparison run it once per code tree (``PYTHONPATH=OTHER_TREE/plugin python
benchmarks/teacher_cache_speed.py ...``, the script prints which facedistill it timed).

    python benchmarks/teacher_cache_speed.py --workdir bench_out/cache_speed [--identities 40] [--rounds 2]
    python benchmarks/teacher_cache_speed.py --workdir bench_out/cache_speed --cache-nproc 1 2 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import arcface_torch_cpu as bench  # noqa: E402  (the arcface_torch benchmark's checkout and speed helpers)

RECIPE = "celeba299_mbf_md"
CACHE = "data/cache_bench/teacher_sface"


def pack_subset(root: Path, identities: int) -> tuple[int, int]:
    """``data/cache_bench``: the first ``identities`` training identities (symlinked), packed; (classes, images)."""
    excluded = set(bench.SPLIT.joinpath("val_identities.txt").read_text().split())
    faces = root / "data" / "cache_bench_faces"
    chosen = [p for p in sorted((bench.SHARED / "data" / "celeba299").iterdir()) if p.name not in excluded]
    chosen = chosen[:identities]
    if not faces.exists():
        faces.mkdir(parents=True)
        for folder in chosen:
            (faces / folder.name).symlink_to(folder)
    if not (root / "data" / "cache_bench" / "train.rec").exists():
        bench.check([sys.executable, "-m", "facedistill.cli", "pack", str(faces), "data/cache_bench"], root)
    return len(chosen), sum(1 for _ in faces.glob("*/*"))


def cache_round(root: Path, nproc: int, recipe: str, images: int) -> float:
    # A build from nothing: with several ranks --overwrite resumes a complete cache of the same teacher and data
    # (another rank of the same job may be writing it), so the previous round's cache is removed first.
    shutil.rmtree(root / CACHE, ignore_errors=True)
    command = bench.torchrun(nproc, "-m", "facedistill.cli", "arcface-torch", "cache-teacher", recipe, "--overwrite")
    started = time.perf_counter()
    subprocess.run(command, cwd=root, env=bench.environment(), check=True, capture_output=True)
    return images / (time.perf_counter() - started)


def compare_process_counts(
    root: Path, recipe: str, images: int, counts: list[int], rounds: int, results: Path | None
) -> None:
    rates: dict[int, list[float]] = {count: [] for count in counts}
    for round_index in range(rounds):
        for count in counts:
            rates[count].append(cache_round(root, count, recipe, images))
            print(f"round {round_index + 1}: {count} process(es) {rates[count][-1]:.2f} img/s", flush=True)
    medians = {count: statistics.median(values) for count, values in rates.items()}
    for count, median in medians.items():
        print(f"{images} images, {count} process(es): teacher cache {median:.2f} img/s (median of {rounds})")
    if results:
        report = {"images": images, "cache_img_s": {str(k): v for k, v in rates.items()}, "medians": medians}
        results.parent.mkdir(parents=True, exist_ok=True)
        results.write_text(json.dumps(report, indent=1) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("bench_out/cache_speed"))
    parser.add_argument("--identities", type=int, default=40)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--speed-samples", type=int, default=2, help="training speed readings per round")
    parser.add_argument("--results", type=Path)
    parser.add_argument("--cache-nproc", type=int, nargs="+", help="time only the cache, at these process counts")
    args = parser.parse_args()
    import facedistill

    print(f"facedistill {facedistill.__version__} from {Path(facedistill.__file__).parent}", flush=True)
    root = bench.patched_checkout(args.workdir.resolve())
    classes, images = pack_subset(root, args.identities)
    overrides = {
        "rec": "data/cache_bench",
        "teacher_cache": CACHE,
        "num_classes": classes,
        "num_image": images,
        "num_epoch": 20,
        "verbose": 10**9,
        "frequent": 5,
        "val_targets": [],
        "output": "work_dirs/cache_speed",
    }
    recipe = bench.bench_recipe(root, RECIPE, "_cache_speed", overrides)
    if args.cache_nproc:
        compare_process_counts(root, recipe, images, args.cache_nproc, args.rounds, args.results)
        return
    cache_rates: list[float] = []
    train_rates: list[float] = []
    for _ in range(args.rounds):
        cache_rates.append(cache_round(root, args.nproc, recipe, images))
        train_rates += bench.speed_round(root, args.nproc, recipe, args.speed_samples)
        print(f"cache {cache_rates[-1]:.2f} img/s, training {train_rates[-args.speed_samples :]} img/s", flush=True)
    cache, train = statistics.median(cache_rates), statistics.median(train_rates)
    report = {
        "facedistill": str(Path(facedistill.__file__).parent),
        "images": images,
        "nproc": args.nproc,
        "cache_img_s": cache_rates,
        "train_img_s": train_rates,
        "cache_over_train": cache / train,
    }
    print(f"{images} images, {args.nproc} processes: teacher cache {cache:.2f} img/s (median of {len(cache_rates)}), "
          f"training {train:.2f} img/s (median of {len(train_rates)}): cache/train = {cache / train:.2f}")  # fmt: skip
    if args.results:
        args.results.parent.mkdir(parents=True, exist_ok=True)
        args.results.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
