"""The framework's own baseline against MarginDistillation, both trained by the patched upstream ``train_v2.py``.

Runs insightface's arcface_torch (a patched copy of ../shared/upstream/arcface_torch) on the CPU protocol with the
shipped recipes ``celeba299_mbf`` (ArcFace, CombinedMarginLoss + PartialFC_V2) and ``celeba299_mbf_md``
(MarginDistillation against SFace's frozen class centres): same seed, schedule and steps, 2 gloo processes. It
reports the framework's own LFW verification of the last model of each (CallBackVerification on lfw.bin, read at
the last step only: nothing is selected on it), and the train img/s of both, measured in this run by interleaved
rounds (A B A B) of the same training so that background load affects both alike.

    python benchmarks/arcface_torch_cpu.py --workdir bench_out/arcface_torch_cpu [--epochs 6] [--speed-rounds 2]

Writes ``results.json`` and ``results.md`` into ``--workdir`` and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
UPSTREAM = SHARED / "upstream" / "arcface_torch"
RECIPES = {"arcface": "celeba299_mbf", "margin_distillation": "celeba299_mbf_md"}
SPEED = re.compile(r"Speed (\d+\.\d+) samples/sec")
ACCURACY = re.compile(r"\[lfw\]\[(\d+)\]Accuracy-Flip: (\d\.\d+)\+-(\d\.\d+)")
LOSS = re.compile(r"Loss (\d+\.\d+)")


def environment() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun(nproc: int, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
            str(free_port()), *args]  # fmt: skip


def check(command: list[str], cwd: Path) -> None:
    print("+", " ".join(command), flush=True)
    subprocess.run(command, cwd=cwd, env=environment(), check=True)


def prepare(workdir: Path, nproc: int) -> Path:
    """A patched checkout with the CPU protocol's data packed into it and the teacher cached (all resumable)."""
    root = workdir / "arcface_torch"
    if not root.exists():
        shutil.copytree(UPSTREAM, root)
        for path in [root, *root.rglob("*")]:
            path.chmod(path.stat().st_mode | 0o200)
    facedistill = [sys.executable, "-m", "facedistill.cli"]
    check([*facedistill, "arcface-torch", "patch", str(root)], cwd=root)
    data = root / "data" / "celeba299"
    if not (data / "train.rec").exists():
        check([*facedistill, "pack", str(SHARED / "data" / "celeba299"), "data/celeba299"], cwd=root)
    if not (data / "lfw.bin").exists():
        lfw, pairs = str(SHARED / "data" / "lfw"), str(SHARED / "data" / "lfw_pairs.txt")
        check([*facedistill, "pack", lfw, "data/celeba299/lfw.bin", "--pairs", pairs], cwd=root)
    check(torchrun(nproc, "-m", "facedistill.cli", "arcface-torch", "cache-teacher", "configs/celeba299_mbf_md"), root)
    return root


def bench_recipe(root: Path, name: str, suffix: str, overrides: dict[str, object]) -> str:
    """configs/<name><suffix>.py: the shipped recipe with ``overrides`` appended (later assignments win)."""
    text = (root / "configs" / f"{name}.py").read_text()
    text += "\n# benchmarks/arcface_torch_cpu.py\n" + "".join(f"config.{k} = {v!r}\n" for k, v in overrides.items())
    (root / "configs" / f"{name}{suffix}.py").write_text(text)
    return f"configs/{name}{suffix}"


def train(root: Path, nproc: int, recipe: str) -> tuple[float | None, Path]:
    started = time.perf_counter()
    check(torchrun(nproc, "train_v2.py", recipe), root)
    return time.perf_counter() - started, root / "work_dirs" / Path(recipe).name / "training.log"


def _finished(log: Path, steps: int) -> bool:
    return log.exists() and any(int(step) == steps for step, _, _ in ACCURACY.findall(log.read_text()))


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=REPO / "bench_out" / "arcface_torch_cpu")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--speed-rounds", type=int, default=2)
    parser.add_argument("--speed-samples", type=int, default=6, help="speed readings (10 steps each) per round")
    parser.add_argument("--skip-training", action="store_true", help="only the speed rounds")
    args = parser.parse_args()
    args.workdir = args.workdir.resolve()
    if not UPSTREAM.is_dir():
        raise SystemExit(f"upstream arcface_torch not found at {UPSTREAM} (../shared beside the repository)")
    args.workdir.mkdir(parents=True, exist_ok=True)
    root = prepare(args.workdir, args.nproc)

    steps = 6300 // (64 * args.nproc) * args.epochs
    results: dict[str, dict[str, object]] = {}
    for method, name in RECIPES.items():
        recipe = bench_recipe(root, name, "_bench", {"num_epoch": args.epochs, "verbose": steps})
        entry: dict[str, object] = {"recipe": f"recipes/{name}.py", "epochs": args.epochs, "steps": steps}
        if not args.skip_training:
            log = root / "work_dirs" / Path(recipe).name / "training.log"
            if _finished(log, steps):
                # Resumable: a training whose log already holds its last step's verification is not run again.
                seconds = None
            else:
                seconds, log = train(root, args.nproc, recipe)
            text = log.read_text()
            accuracies = ACCURACY.findall(text)
            losses = [float(value) for value in LOSS.findall(text)]
            step, mean, std = accuracies[-1]
            entry.update(
                train_seconds=None if seconds is None else round(seconds, 1),
                lfw_step=int(step),
                lfw_mean=float(mean) * 100,
                lfw_std=float(std) * 100,
                loss_first=losses[0],
                loss_last=losses[-1],
            )
        results[method] = entry

    speeds: dict[str, list[float]] = {method: [] for method in RECIPES}
    for _ in range(args.speed_rounds):
        for method, name in RECIPES.items():
            # Enough steps for the readings (10 steps each, the first only starts the clock); no val target, so the
            # rounds start without loading LFW.
            epochs = 1 + (args.speed_samples + 2) * 10 // (steps // args.epochs)
            overrides = {"num_epoch": epochs, "verbose": 10**9, "frequent": 10, "val_targets": []}
            recipe = bench_recipe(root, name, "_speed", overrides)
            speeds[method] += speed_round(root, args.nproc, recipe, args.speed_samples)
    for method in RECIPES:
        results[method]["img_per_s_median"] = statistics.median(speeds[method])
        results[method]["img_per_s_readings"] = speeds[method]
    ratio = results["margin_distillation"]["img_per_s_median"] / results["arcface"]["img_per_s_median"]

    from facedistill.models import count_macs, count_parameters, create_model

    student = create_model("mbf", embedding_size=128)
    summary = {
        "command": "python benchmarks/arcface_torch_cpu.py " + " ".join(sys.argv[1:]),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
        "processes": args.nproc,
        "student": {
            "network": "mbf (arcface_torch get_mbf), 128-d",
            "params": count_parameters(student),
            "macs": count_macs(student),
        },  # fmt: skip
        "methods": results,
        "md_over_arcface_img_per_s": ratio,
    }
    (args.workdir / "results.json").write_text(json.dumps(summary, indent=2))
    lines = [
        f"# arcface_torch train_v2.py on CPU: {args.epochs} epochs of CelebA-299, {args.nproc} gloo processes",
        "",
        f"Command: `{summary['command']}`  ",
        f"Machine: {summary['machine']}  ",
        f"Student: {summary['student']['network']}, {summary['student']['params'] / 1e6:.2f} M params, "
        f"{summary['student']['macs'] / 1e6:.0f} M MACs",
        "",
        "| method | LFW (framework's CallBackVerification, last model) | train img/s (median) | loss first -> last |",
        "|---|---|---|---|",
    ]
    for method, entry in results.items():
        lfw = f"{entry['lfw_mean']:.2f} ± {entry['lfw_std']:.2f}" if "lfw_mean" in entry else "not trained"
        loss = f"{entry['loss_first']:.2f} -> {entry['loss_last']:.2f}" if "loss_first" in entry else ""
        lines.append(f"| {method} | {lfw} | {entry['img_per_s_median']:.2f} | {loss} |")
    lines += ["", f"MarginDistillation img/s / ArcFace img/s = **{ratio:.3f}** (target >= 0.97)"]
    (args.workdir / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
