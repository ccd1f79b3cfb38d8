"""The framework's own ArcFace against MarginDistillation, paper and validated, all trained by upstream ``train_v2.py``.

Runs insightface's arcface_torch (a patched copy of ../shared/upstream/arcface_torch) on the CPU protocol's
validation split with the shipped recipes, 2 gloo processes, the same seed, schedule and steps for each:

    arcface      celeba299_mbf               the framework's CombinedMarginLoss + PartialFC_V2
    md_official  celeba299_mbf_md_official   MarginDistillation as the official code computes it (preset official)
    md           celeba299_mbf_md            facedistill's validated recipe (preset facedistill, s 32, centred)

Each trains on the 269 training identities; the framework's CallBackVerification reads the 600 held-out pairs
(``celeba299_val.bin``, its only val target) at the last step. After training, LFW (the test set) is read once per
model by facedistill's evaluation path on ``model.pt``: nothing is chosen on it. Reported: LFW mean +- std over
seeds x folds, paired per-fold differences against ``arcface``, the angle of 1,024 training images to their
teacher class centre (each student against the centres it trained with; ArcFace against the raw mean centres),
ROC curves, and the train img/s of every row measured in this run by interleaved rounds (A B C A B C) of the same
training, so that background load touches all alike.

    python benchmarks/arcface_torch_cpu.py --workdir bench_out/arcface_torch_val [--seeds 2048 2049] \
        [--rows arcface md_official md] [--speed-rounds 2] [--skip-speed]

Resumable: a run already in the results JSON is not trained again, nor is its LFW read again, and a training whose
log holds its last step's validation is not rerun; with ``--results`` inside ``benchmarks/results/`` (committed as
rows finish) the study spans sessions. Writes the results JSON (default ``WORKDIR/results.json``) and, beside it
with its stem, the table (``.md``), ``_roc_lfw.png`` and ``_angles_<row>.png``, and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
UPSTREAM = SHARED / "upstream" / "arcface_torch"
SPLIT = REPO / "recipes" / "splits" / "celeba299"
RECIPES = {"arcface": "celeba299_mbf", "md_official": "celeba299_mbf_md_official", "md": "celeba299_mbf_md"}
SPEED = re.compile(r"Speed (\d+\.\d+) samples/sec")
VAL = re.compile(r"\[celeba299_val\]\[(\d+)\]Accuracy-Flip: (\d\.\d+)\+-(\d\.\d+)")
LOSS = re.compile(r"Loss (\d+\.\d+)")
ANGLE_IMAGES = 1024


def environment() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def torchrun(nproc: int, *args: str) -> list[str]:
    # --standalone binds the rendezvous store on port 0 and holds it: no probed port another program can take.
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), *args]


def check(command: list[str], cwd: Path) -> None:
    print("+", " ".join(command), flush=True)
    subprocess.run(command, cwd=cwd, env=environment(), check=True)


def patched_checkout(workdir: Path) -> Path:
    """``workdir/arcface_torch``: a writable copy of the upstream snapshot, patched (both steps resumable)."""
    root = workdir / "arcface_torch"
    if not root.exists():
        shutil.copytree(UPSTREAM, root)
        for path in [root, *root.rglob("*")]:
            path.chmod(path.stat().st_mode | 0o200)
    check([sys.executable, "-m", "facedistill.cli", "arcface-torch", "patch", str(root)], cwd=root)
    return root


def prepare(workdir: Path, nproc: int, rows: list[str]) -> Path:
    """A patched checkout with the validation split packed into it and the teacher cached (all resumable)."""
    root = patched_checkout(workdir)
    facedistill = [sys.executable, "-m", "facedistill.cli"]
    data = root / "data" / "celeba299"
    celeba = str(SHARED / "data" / "celeba299")
    if not (data / "train.rec").exists():
        check([*facedistill, "pack", celeba, "data/celeba299", "--exclude", str(SPLIT / "val_identities.txt")], root)
    if not (data / "celeba299_val.bin").exists():
        pairs = str(SPLIT / "val_pairs.tsv")
        check([*facedistill, "pack", celeba, "data/celeba299/celeba299_val.bin", "--pairs", pairs], cwd=root)
    if any(row != "arcface" for row in rows):
        cache_teacher = ("-m", "facedistill.cli", "arcface-torch", "cache-teacher", f"configs/{RECIPES['md']}")
        check(torchrun(nproc, *cache_teacher), root)
    return root


def bench_recipe(root: Path, name: str, suffix: str, overrides: dict[str, object]) -> str:
    """configs/<name><suffix>.py: the shipped recipe with ``overrides`` appended (later assignments win)."""
    text = (root / "configs" / f"{name}.py").read_text()
    text += "\n# benchmarks/arcface_torch_cpu.py\n" + "".join(f"config.{k} = {v!r}\n" for k, v in overrides.items())
    (root / "configs" / f"{name}{suffix}.py").write_text(text)
    return f"configs/{name}{suffix}"


def recipe_steps(root: Path, name: str) -> int:
    """The recipe's last step (``config.verbose``: the one validation of the run), read from its file."""
    match = re.search(r"^config\.verbose = (\d+)", (root / "configs" / f"{name}.py").read_text(), re.MULTILINE)
    if match is None:
        raise SystemExit(f"configs/{name}.py sets no config.verbose: the benchmark validates at the last step only")
    return int(match.group(1))


def finished(log: Path, steps: int) -> bool:
    return log.exists() and any(int(step) == steps for step, _, _ in VAL.findall(log.read_text()))


def train_row(root: Path, nproc: int, row: str, seed: int) -> dict[str, Any]:
    """Train (unless finished) and read the framework's log: val accuracy at the last step, losses, wall time."""
    name = RECIPES[row]
    steps = recipe_steps(root, name)
    output = f"work_dirs/{row}_seed{seed}"
    recipe = bench_recipe(root, name, f"_seed{seed}", {"seed": seed, "output": output})
    log = root / output / "training.log"
    seconds = None
    if not finished(log, steps):
        started = time.perf_counter()
        check(torchrun(nproc, "train_v2.py", recipe), root)
        seconds = round(time.perf_counter() - started, 1)
    text = log.read_text()
    step, mean, std = VAL.findall(text)[-1]
    losses = [float(value) for value in LOSS.findall(text)]
    tail = losses[-max(1, len(losses) // 10) :]
    return {
        "row": row,
        "seed": seed,
        "recipe": f"recipes/{name}.py",
        "steps": steps,
        "train_seconds": seconds,
        "val_step": int(step),
        "val_mean": float(mean) * 100,
        "val_std": float(std) * 100,
        "loss_first": losses[0],
        "loss_last_tenth": statistics.mean(tail),
        "model": str(root / output / "model.pt"),
    }


def read_lfw_and_angles(root: Path, entry: dict[str, Any], lfw: Any, angle_set: Any, centres: dict[str, Any]) -> None:
    """LFW once (facedistill's evaluation path on the framework's model.pt) and the angles to the teacher centres."""
    from facedistill.eval.verify import evaluate_pairs, student_embedder
    from facedistill.pipeline import angles_to_centres
    from facedistill.train.checkpoint import load_student

    student, _ = load_student(entry["model"])
    embed = student_embedder(student)
    result, _ = evaluate_pairs(embed, lfw, num_workers=1)
    entry["lfw"] = result.to_dict()
    entry["angles"] = angles_to_centres(embed, angle_set, centres[entry["row"]]).tolist()


def teacher_centres(root: Path, rows: list[str]) -> tuple[Any, dict[str, Any], dict[str, np.ndarray]]:
    """The 1,024 angle images, the centres each row trained against, and the teacher's own angles to them."""
    from torch.utils.data import Subset

    from facedistill.arcface_torch.data import open_framework_dataset
    from facedistill.teachers.cache import TeacherCache, class_centres

    dataset = open_framework_dataset(root / "data" / "celeba299")
    cache = TeacherCache(root / "data" / "celeba299" / "teacher_sface")
    picked = np.sort(np.random.default_rng(0).permutation(len(dataset))[:ANGLE_IMAGES])
    labels = np.asarray(dataset.labels)
    offset = cache.mean_embedding()
    centres, teacher = {}, {}
    for row in rows:
        # md trains in the centred teacher space (config.teacher_subtract_mean); the others see the raw centres.
        row_offset = offset if row == "md" else None
        centres[row], _ = class_centres(cache, labels, dataset.num_classes, "mean", row_offset)
        cos = cache.typicality(centres[row], labels, offset=row_offset)[:, 0].clamp(-1, 1)
        teacher[row] = np.degrees(np.arccos(cos.numpy()))[picked]
    return Subset(dataset, picked.tolist()), centres, teacher


def speed_round(root: Path, nproc: int, recipe: str, samples: int) -> list[float]:
    """Start the training, keep its first ``samples`` speed readings after the first (start-up), then stop it."""
    command = torchrun(nproc, "train_v2.py", recipe)
    process = subprocess.Popen(
        command, cwd=root, env=environment(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )  # fmt: skip
    speeds: list[float] = []
    assert process.stdout is not None
    for line in process.stdout:
        match = SPEED.search(line)
        if match:
            speeds.append(float(match.group(1)))
            if len(speeds) > samples:
                break
    os.killpg(process.pid, signal.SIGTERM)
    process.wait()
    if len(speeds) <= samples:
        raise RuntimeError(f"{recipe} stopped after {len(speeds)} speed readings")
    return speeds[1:]


def measure_speed(root: Path, nproc: int, rows: list[str], rounds: int, samples: int) -> dict[str, list[float]]:
    speeds: dict[str, list[float]] = {row: [] for row in rows}
    for _ in range(rounds):
        for row in rows:
            # Enough steps for the readings (10 steps each, the first only starts the clock); no val target.
            overrides = {
                "num_epoch": 4,
                "verbose": 10**9,
                "frequent": 10,
                "val_targets": [],
                "output": "work_dirs/speed",
            }
            speeds[row] += speed_round(root, nproc, bench_recipe(root, RECIPES[row], "_speed", overrides), samples)
    return speeds


def table(report: dict[str, Any], rows: list[str], seeds: list[int], teacher: dict[str, np.ndarray]) -> list[str]:
    runs = report["runs"]
    baseline = rows[0]
    lines = [
        "| row | recipe | val acc. % (600 held-out pairs, per seed) | LFW % (mean ± std, seeds x folds) | "
        f"paired diff. to {baseline} (pp) | TAR@FAR=1e-3 | angle to teacher centre (deg) | train img/s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        keys = [f"{row}_seed{seed}" for seed in seeds if "lfw" in runs.get(f"{row}_seed{seed}", {})]
        if not keys:
            lines.append(f"| {row} | recipes/{RECIPES[row]}.py | not run | | | | | |")
            continue
        folds = np.concatenate([runs[key]["lfw"]["fold_accuracies"] for key in keys]) * 100
        base_keys = [key.replace(row, baseline, 1) for key in keys]
        diff = "–"
        if row != baseline and all("lfw" in runs.get(key, {}) for key in base_keys):
            base = np.concatenate([runs[key]["lfw"]["fold_accuracies"] for key in base_keys]) * 100
            delta = folds - base
            diff = f"{delta.mean():+.2f} ± {delta.std(ddof=1):.2f}"
        val = ", ".join(f"{runs[key]['val_mean']:.2f}" for key in keys)
        tars = [runs[key]["lfw"]["tar_at_far"].get("0.001") for key in keys]
        tar = "–" if None in tars else f"{100 * statistics.mean(float(t) for t in tars):.2f}"
        angle = statistics.mean(float(np.mean(runs[key]["angles"])) for key in keys)
        speed = report.get("speed", {}).get(row)
        speed_text = f"{statistics.median(speed):.2f}" if speed else "not measured"
        lines.append(
            f"| {row} | recipes/{RECIPES[row]}.py | {val} | {folds.mean():.2f} ± {folds.std(ddof=1):.2f} "
            f"({len(keys)} seed{'s' * (len(keys) > 1)}) | {diff} | {tar} | {angle:.1f} "
            f"(teacher {teacher[row].mean():.1f}) | {speed_text} |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=REPO / "bench_out" / "arcface_torch_val")
    parser.add_argument("--rows", nargs="+", choices=list(RECIPES), default=list(RECIPES))
    parser.add_argument("--seeds", nargs="+", type=int, default=[2048, 2049])
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--speed-rounds", type=int, default=2)
    parser.add_argument("--speed-samples", type=int, default=4, help="speed readings (10 steps each) per round")
    parser.add_argument("--skip-speed", action="store_true", help="train and read LFW only")
    parser.add_argument("--skip-training", action="store_true", help="only the speed rounds")
    parser.add_argument(
        "--results",
        type=Path,
        default=None,
        help="results JSON (default WORKDIR/results.json); the table, ROC and angle plots are written beside it with "
        "its stem. Point it into benchmarks/results/ and commit it as rows finish: a later session resumes from it",
    )
    args = parser.parse_args()
    args.workdir = args.workdir.resolve()
    if not UPSTREAM.is_dir():
        raise SystemExit(f"upstream arcface_torch not found at {UPSTREAM} (../shared beside the repository)")
    args.workdir.mkdir(parents=True, exist_ok=True)
    root = prepare(args.workdir, args.nproc, args.rows)
    results_path = (args.results or args.workdir / "results.json").resolve()
    results_path.parent.mkdir(parents=True, exist_ok=True)
    stem = results_path.with_suffix("")
    report: dict[str, Any] = json.loads(results_path.read_text()) if results_path.exists() else {"runs": {}}

    def save() -> None:
        results_path.write_text(json.dumps(report) + "\n")

    lfw_reader: dict[str, Any] = {}

    def read_lfw(entry: dict[str, Any]) -> None:
        """LFW and the angles of one finished run, right away, so an interrupted study keeps its readings."""
        if not lfw_reader:
            from facedistill.eval.verify import load_pairs_set

            lfw_reader["lfw"] = load_pairs_set(SHARED / "data" / "lfw_pairs.txt", SHARED / "data" / "lfw", name="lfw")
            lfw_reader["angle_set"], lfw_reader["centres"], _ = teacher_centres(root, list(RECIPES))
        read_lfw_and_angles(root, entry, lfw_reader["lfw"], lfw_reader["angle_set"], lfw_reader["centres"])
        save()

    cached = (root / "data" / "celeba299" / "teacher_sface" / "manifest.json").exists()
    for entry in report["runs"].values():
        if "lfw" not in entry and cached:
            read_lfw(entry)
    if not args.skip_training:
        # Seed-major: one seed of every row first, so an interrupted study still holds a complete comparison.
        for seed in args.seeds:
            for row in args.rows:
                key = f"{row}_seed{seed}"
                if key not in report["runs"]:
                    report["runs"][key] = train_row(root, args.nproc, row, seed)
                    save()
                if "lfw" not in report["runs"][key] and cached:
                    read_lfw(report["runs"][key])
    if any("lfw" not in entry for entry in report["runs"].values()):
        raise SystemExit("LFW and angles wait for the teacher cache: run again with an md row")
    if not args.skip_speed:
        report["speed"] = measure_speed(root, args.nproc, args.rows, args.speed_rounds, args.speed_samples)
        report["speed_rows"] = args.rows
        save()

    from facedistill.eval.metrics import VerificationResult, plot_roc
    from facedistill.models import count_macs, count_parameters, create_model
    from facedistill.pipeline import plot_angle_histograms

    rows = [row for row in RECIPES if any(entry["row"] == row for entry in report["runs"].values())]
    rows = rows or args.rows
    angle_set, centres, teacher = teacher_centres(root, rows)
    curves = {key: VerificationResult.from_dict(entry["lfw"]) for key, entry in report["runs"].items()}
    if curves:
        plot_roc(curves, Path(f"{stem}_roc_lfw.png"), "arcface_torch students on LFW (last model, each seed)")
    for row in rows:
        angles = {
            f"{row} seed {entry['seed']}": np.array(entry["angles"]) for entry in report["runs"].values()
            if entry["row"] == row
        }  # fmt: skip
        plot_angle_histograms(
            angles | {"teacher (SFace)": teacher[row]},
            Path(f"{stem}_angles_{row}.png"),
            f"Angle to the teacher's class centre, {ANGLE_IMAGES} training images: {row}",
        )
    student = create_model("mbf", embedding_size=128)
    params, macs = count_parameters(student), count_macs(student)
    speed = report.get("speed", {})
    ratios = {
        row: statistics.median(speed[row]) / statistics.median(speed["arcface"])
        for row in speed if row != "arcface" and "arcface" in speed
    }  # fmt: skip
    report["summary"] = {
        "command": "python benchmarks/arcface_torch_cpu.py " + " ".join(sys.argv[1:]),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
        "processes": args.nproc,
        "student": {"network": "mbf (arcface_torch get_mbf), 128-d", "params": params, "macs": macs},
        "img_per_s_over_arcface": ratios,
    }
    save()
    seeds = sorted({entry["seed"] for entry in report["runs"].values()}) or args.seeds
    lines = [
        f"# arcface_torch train_v2.py on CPU: the celeba299 validation split, {args.nproc} gloo processes",
        "",
        f"Command: `{report['summary']['command']}`  ",
        f"Machine: {report['summary']['machine']}  ",
        f"Student: mbf (arcface_torch get_mbf), 128-d, {params / 1e6:.2f} M params, {macs / 1e6:.0f} M MACs; "
        f"seeds {seeds}; LFW read once per model, after training",
        "",
        *table(report, rows, seeds, teacher),
        "",
    ]
    for row, ratio in ratios.items():
        lines.append(f"- {row} img/s / arcface img/s = **{ratio:.3f}** (medians of {len(speed[row])} readings)")
    Path(f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
