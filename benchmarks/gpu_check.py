"""The device check of the arcface_torch plugin on one lent GPU: NCCL, fp16, one process (issue 40).

Run by ``benchmarks/gpu_check.sh`` (never a CI test; its ``--dry-run`` is). Every step runs in a child process
with a deadline, so a hang or a crash in one fails that step alone; each prints one ``PASS``/``FAIL`` line and goes
into ``gpu_check.json`` beside the full log. The exit status is 0 only when every step passed.

  prepare     a patched copy of upstream arcface_torch; generated faces (``facedistill.data.synthetic``) packed with
              ``facedistill pack``, and a copy with undecodable images; a randomly initialised arcface_torch r50
              (BatchNorm statistics set on a few faces) saved as a run directory's ``model.pt``: the teacher, cached
              by ``facedistill arcface-torch cache-teacher`` on the GPU (no SFace, no CPU-bound teacher)
  throughput  (a) the patched ``train_v2.py`` under torchrun with ``config.fp16 = True``: the framework's ArcFace
              (``celeba299_mbf``) against MarginDistillation as validated (``celeba299_mbf_md``), batch 128,
              interleaved rounds (A B A B), img/s medians and their ratio MD / ArcFace
  sampling    (b) FrozenPartialFC samples the classes PartialFC_V2 samples, on the device (same seed, positives)
  heads       (c) the MD head (FrozenPartialFC, float16 centres) against PartialFC_V2 (SGD with momentum, as
              train_v2.py trains it) at 100k and 1M classes x 512, batch 128, alone on a single-rank group: step
              time (forward + backward, + the SGD update PartialFC_V2 needs) and peak memory
  resume      (d) ``facedistill distill`` (the toolkit's own loop) on one GPU, killed after its first checkpoint,
              then ``--resume``: its log must go on from that checkpoint's step, and it must finish at the planned
              one
  bad_record  (e) the patched ``train_v2.py`` on a ``.rec`` whose images do not decode: one ``error:`` line and a
              non-zero exit within the deadline, not a hang

``--dry-run`` runs the same steps on the CPU: gloo, fp32, tiny sizes, one thread a process (the CI test runs it).

    python benchmarks/gpu_check.py [--dry-run] --upstream UPSTREAM --results DIR [--work DIR]
    python benchmarks/gpu_check.py --preflight [--dry-run] --upstream UPSTREAM --wheels DIR

Only the standard library is imported at module level: the preflight must answer even where torch is missing,
and the renderer's worker processes start from this module.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import math
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
PREPARE_COMMAND = "bash benchmarks/gpu_check.sh --prepare"
SPEED = re.compile(r"Speed (\d+\.\d+) samples/sec")
# Marks a scratch folder as this check's: only such a folder (or an empty one) is wiped before a run.
WORK_MARKER = ".gpu_check_work"
STEPS = ("prepare", "sampling", "heads", "throughput", "resume", "bad_record")
NEEDS_DATA = ("throughput", "resume", "bad_record")

# Sized for one H100 and 16 cores: the steps take about 3 minutes together, the whole check under 6.
GPU: dict[str, Any] = {
    # 20,000 faces: one epoch (156 steps of 128) holds a whole speed round, 1 + 4 readings of 20 steps (2,560 images)
    # each, so that no reading spans the DataLoader's restart at an epoch's end.
    "identities": 2000, "images": 10, "batch": 128, "workers": 8, "frequent": 20, "samples": 4, "rounds": 2,
    "teacher": "r50", "cache_batch": 256, "cache_workers": 8,
    "sampling_classes": (5000, 100_000), "head_classes": (100_000, 1_000_000), "head_dim": 512, "head_batch": 128,
    "head_rates": (0.1, 1.0), "head_warmup": 3, "head_steps": 10,
    "distill_batch": 64, "distill_steps": 300, "distill_every": 50, "distill_workers": 4,
    "bad_timeout": 60, "budget": 330,
    "timeouts": {"prepare": 150, "sampling": 60, "heads": 120, "throughput": 210, "resume": 150, "bad_record": 90},
}  # fmt: skip
# Tiny, for two loaded CI cores: every step still runs its whole path once (mbf: the cheapest teacher network).
DRY: dict[str, Any] = {
    "identities": 4, "images": 4, "batch": 4, "workers": 1, "frequent": 1, "samples": 1, "rounds": 1,
    "teacher": "mbf", "cache_batch": 16, "cache_workers": 0,
    "sampling_classes": (5000,), "head_classes": (2000,), "head_dim": 64, "head_batch": 16, "head_rates": (0.1, 1.0),
    "head_warmup": 1, "head_steps": 2,
    "distill_batch": 4, "distill_steps": 8, "distill_every": 2, "distill_workers": 0,
    "bad_timeout": 120, "budget": 900,
    "timeouts": {"prepare": 180, "sampling": 120, "heads": 120, "throughput": 240, "resume": 240, "bad_record": 180},
}  # fmt: skip
EMBEDDING = 128  # the student's (mbf, as the celeba299 recipes) and therefore the teacher's


class StepFailed(Exception):
    """A step's check did not hold; the message is its one-line summary."""


# --------------------------------------------------------------------------------------------- preflight


def preflight(dry_run: bool, upstream: Path, wheels: Path) -> str:
    """What is missing, in one line (empty: nothing). What ``--prepare`` provides and torch's presence are looked
    up without importing anything, so their refusal comes at once; only then is torch imported, for the device."""
    import importlib.util

    missing = []
    if not (upstream / "train_v2.py").is_file():
        missing.append(f"the upstream arcface_torch copy {upstream}")
    if importlib.util.find_spec("easydict") is None and not sorted(wheels.glob("easydict-*.whl")):
        missing.append(f"easydict (neither installed nor a wheel in {wheels})")
    if missing:
        prepare = f"prepare with `{PREPARE_COMMAND}` where ../shared/upstream and pip are, then carry .gpu_check"
        return f"gpu_check: cannot run: missing {'; '.join(missing)}; {prepare}"
    if importlib.util.find_spec("torch") is None:
        return f"gpu_check: cannot run: {sys.executable} has no torch (name another with GPU_CHECK_PYTHON)"
    if not dry_run:
        import torch

        if not torch.cuda.is_available() or torch.cuda.device_count() < 1:
            return f"gpu_check: cannot run: no CUDA device (torch {torch.__version__} sees none); on a CPU: --dry-run"
    return ""


# ----------------------------------------------------------------------------------- child processes


def child_environment() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    # A hang killed at its deadline leaves every thread's stack in the log (SIGABRT, see run_with_deadline).
    env.update(PYTHONUNBUFFERED="1", PYTHONFAULTHANDLER="1")
    return env


def stop_session(process: subprocess.Popen, grace_s: float = 5.0) -> None:
    """SIGABRT (faulthandler's stacks), then SIGKILL, to every process of the child's session."""
    for sig in (signal.SIGABRT, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(grace_s)
            if sig == signal.SIGABRT:
                time.sleep(0.5)  # let the grandchildren write their stacks too
        except subprocess.TimeoutExpired:
            pass
    process.wait()


def run_with_deadline(
    command: list[str], cwd: Path, timeout: float, on_line: Callable[[str], bool] | None = None
) -> tuple[int | None, list[str]]:
    """Run ``command`` in a session of its own, echoing its output; returns (exit code, or None when it was stopped
    at ``timeout``; its output lines). ``on_line`` returning True stops it early (SIGTERM to its session)."""
    print("+", " ".join(command), flush=True)
    process = subprocess.Popen(
        command, cwd=cwd, env=child_environment(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        errors="replace", start_new_session=True,
    )  # fmt: skip
    timed_out = threading.Event()

    def watchdog() -> None:
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            timed_out.set()
            stop_session(process)

    threading.Thread(target=watchdog, daemon=True).start()
    lines: list[str] = []
    stopping = False
    assert process.stdout is not None
    for line in process.stdout:  # read to the end, also once stopping: a full pipe would block its writers
        print(line, end="", flush=True)
        lines.append(line.rstrip("\n"))
        if not stopping and on_line is not None and on_line(line):
            stopping = True
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        stop_session(process)
    return (None if timed_out.is_set() else process.returncode), lines


def torchrun(*args: str) -> list[str]:
    """torchrun, one process; ``--standalone`` binds its rendezvous store on port 0 (no port is probed)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1", *args]


def facedistill_cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "facedistill.cli", *args]


# --------------------------------------------------------------------------------------------- prepare


def _render(job: tuple[str, int, int, int]) -> None:
    from facedistill.data.synthetic import write_identity_folders

    root, count, images, first = job
    write_identity_folders(root, count, images, seed=0, first_identity=first)


def render_faces(faces: Path, identities: int, images: int) -> None:
    """``faces/id_XXXXX/NNN.jpg``, the identities split over the cores (each identity's drawings depend on its
    number only, so the split changes no image)."""
    workers = min(os.cpu_count() or 1, 16, max(1, identities // 32))
    if workers == 1:
        _render((str(faces), identities, images, 0))
        return
    import multiprocessing

    step = math.ceil(identities / workers)
    jobs = [(str(faces), min(step, identities - first), images, first) for first in range(0, identities, step)]
    # spawn: this module imports nothing heavy, so the workers start in a fraction of a second and share no state.
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        pool.map(_render, jobs)


def cli_in_process(*args: str) -> None:
    """A ``facedistill`` command in this process (one interpreter fewer than a subprocess)."""
    from facedistill.cli import app

    print("+ facedistill", " ".join(args), flush=True)
    code = app(list(args), standalone_mode=False)
    if code not in (None, 0):
        raise StepFailed(f"facedistill {args[0]} exited with {code}")


def write_recipe(root: Path, base: str, name: str, overrides: dict[str, object]) -> str:
    """configs/<name>.py: the shipped recipe ``base`` with ``overrides`` appended (later assignments win)."""
    text = (root / "configs" / f"{base}.py").read_text()
    text += "\n# benchmarks/gpu_check.py\n" + "".join(f"config.{k} = {v!r}\n" for k, v in overrides.items())
    (root / "configs" / f"{name}.py").write_text(text)
    return f"configs/{name}"


def save_random_teacher(root: Path, network: str, faces: Path, directory: Path, device: str) -> Path:
    """A randomly initialised arcface_torch backbone saved as a run directory's ``model.pt``: the teacher is only
    there to be embedded on the device and read by the head, not to be good. Its BatchNorm statistics are set on
    a few of the faces first: with the initial ones (mean 0, variance 1) a deep random network's activations grow
    layer by layer into float16 infinities in the cache, and every loss that reads them is NaN."""
    import cv2
    import numpy as np
    import torch

    sys.path.insert(0, str(root))
    from backbones import get_model  # the checkout's own arcface_torch backbones

    torch.manual_seed(0)
    model = get_model(network, dropout=0.0, fp16=False, num_features=EMBEDDING).to(device)
    every = sorted(faces.glob("*/*.jpg"))
    files = every[:: max(1, len(every) // 64)][:64]  # spread over the identities
    rgb = np.stack([cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB) for path in files])
    images = (torch.from_numpy(rgb).permute(0, 3, 1, 2).float().to(device) - 127.5) / 127.5
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None  # a plain average over the calibration batches
    model.train()
    with torch.no_grad():
        for batch in images.split(32):
            model(batch)
        model.eval()
        embeddings = model(images)
    if not torch.isfinite(embeddings).all() or embeddings.abs().max() > 6e4:  # float16's range, the cache's dtype
        raise StepFailed(f"the random {network} teacher's embeddings overflow float16 even with set BatchNorm")
    directory.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.cpu() for k, v in model.state_dict().items()}, directory / "model.pt")
    return directory


def corrupt_images(source: Path, target: Path) -> int:
    """A copy of the ``train.rec`` pack in ``source`` whose every other image is zeroed bytes (header intact): the
    records read, their images do not decode. Returns how many were zeroed."""
    from facedistill.data.recordio import RecordIOWriter, iter_records, pack_record, unpack_record

    target.mkdir(parents=True, exist_ok=True)
    keys = [int(line.split("\t")[0]) for line in (source / "train.idx").read_text().splitlines() if line.strip()]
    zeroed = 0
    with RecordIOWriter(target / "train.rec", target / "train.idx") as writer:
        for key, (_, record) in zip(keys, iter_records(source / "train.rec"), strict=True):
            header, payload = unpack_record(record)
            if header.flag == 0 and payload and key % 2 == 0:
                payload, zeroed = bytes(len(payload)), zeroed + 1
            writer.write(key, pack_record(header, payload))
    shutil.copyfile(source / "property", target / "property")
    return zeroed


def recipes(root: Path, size: dict[str, Any], dry_run: bool, teacher: Path) -> dict[str, str]:
    images = size["identities"] * size["images"]
    per_epoch = images // size["batch"]
    # Enough steps for the speed readings (the first reading only starts the clock), whatever the epoch length.
    needed = (size["samples"] + 3) * size["frequent"]
    common = {
        "rec": "data/synthetic", "num_classes": size["identities"], "num_image": images,
        "batch_size": size["batch"], "num_epoch": 1 + math.ceil(needed / per_epoch), "verbose": 10**9,
        "frequent": size["frequent"], "val_targets": [], "fp16": not dry_run, "num_workers": size["workers"],
    }  # fmt: skip
    md = {**common, "output": "work_dirs/md", "teacher": str(teacher), "teacher_cache": "data/synthetic/teacher"}
    return {
        "arcface": write_recipe(root, "celeba299_mbf", "gpu_check_arcface", {**common, "output": "work_dirs/arcface"}),
        "md": write_recipe(root, "celeba299_mbf_md", "gpu_check_md", md),
        "bad": write_recipe(
            root, "celeba299_mbf", "gpu_check_bad", {**common, "rec": "data/bad", "output": "work_dirs/bad"}
        ),
    }


def step_prepare(work: Path, upstream: Path, size: dict[str, Any], dry_run: bool) -> dict[str, Any]:
    started = time.perf_counter()
    root = work / "arcface_torch"
    shutil.copytree(upstream, root, ignore=shutil.ignore_patterns("__pycache__"))
    for path in [root, *root.rglob("*")]:
        path.chmod(path.stat().st_mode | 0o200)
    cli_in_process("arcface-torch", "patch", str(root))
    faces = work / "faces"
    render_faces(faces, size["identities"], size["images"])
    rendered = time.perf_counter()
    cli_in_process("pack", str(faces), str(root / "data" / "synthetic"))
    zeroed = corrupt_images(root / "data" / "synthetic", root / "data" / "bad")
    teacher = save_random_teacher(root, size["teacher"], faces, work / "teacher", "cpu" if dry_run else "cuda")
    names = recipes(root, size, dry_run, teacher)
    packed = time.perf_counter()
    # In this process (one interpreter fewer): it embeds on GPU 0 here, as under torchrun on GPU LOCAL_RANK.
    cache = ["arcface-torch", "cache-teacher", names["md"], "--root", str(root)]
    cli_in_process(*cache, "--batch-size", str(size["cache_batch"]), "--workers", str(size["cache_workers"]))
    images = size["identities"] * size["images"]
    seconds = {
        "render": round(rendered - started, 1),
        "pack": round(packed - rendered, 1),
        "cache_teacher": round(time.perf_counter() - packed, 1),
    }
    summary = (
        f"{images} faces of {size['identities']} identities packed, {zeroed} of them zeroed in data/bad, "
        f"random {size['teacher']} teacher cached ({seconds['cache_teacher']} s)"
    )
    return {"summary": summary, "images": images, "teacher": size["teacher"], "seconds_by_part": seconds,
            "recipes": names}  # fmt: skip


# ---------------------------------------------------------------------------------------- throughput (a)


def speed_round(root: Path, recipe: str, samples: int, timeout: float) -> list[float]:
    """Train ``recipe`` until ``samples`` speed readings after the first (which includes start-up), then stop."""
    speeds: list[float] = []

    def reading(line: str) -> bool:
        match = SPEED.search(line)
        if match:
            speeds.append(float(match.group(1)))
        return len(speeds) > samples

    code, lines = run_with_deadline(torchrun("train_v2.py", recipe), root, timeout, reading)
    if len(speeds) <= samples:
        last = next((line for line in reversed(lines) if line.strip()), "")
        why = "timed out" if code is None else f"exit {code}"
        raise StepFailed(f"{recipe}: {len(speeds)} speed readings, {why}: {last.strip()[:300]}")
    return speeds[1:]


def step_throughput(work: Path, size: dict[str, Any], dry_run: bool, deadline: float) -> dict[str, Any]:
    root = work / "arcface_torch"
    names = {"arcface": "configs/gpu_check_arcface", "md": "configs/gpu_check_md"}
    speeds: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(size["rounds"]):
        for name, recipe in names.items():  # interleaved (A B A B): background load touches both alike
            left = max(1.0, deadline - time.monotonic())
            speeds[name] += speed_round(root, recipe, size["samples"], left)
    medians = {name: statistics.median(values) for name, values in speeds.items()}
    ratio = medians["md"] / medians["arcface"]
    summary = f"arcface {medians['arcface']:.0f} img/s, md {medians['md']:.0f} img/s, md / arcface {ratio:.3f}"
    return {"summary": summary, "speeds": speeds, "medians": medians, "ratio_md_over_arcface": ratio,
            "batch": size["batch"], "fp16": not dry_run, "readings_per_round": size["samples"]}  # fmt: skip


# ------------------------------------------------------------------------------------ sampling (b), heads (c)


def single_rank_group(work: Path, device: str) -> None:
    """A process group of one rank (NCCL on the GPU), met in a file: PartialFC_V2 asks the group for its rank."""
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return
    if device == "cuda":
        torch.cuda.set_device(0)
    rendezvous = work / f"rendezvous-{os.getpid()}"
    rendezvous.unlink(missing_ok=True)
    backend = "nccl" if device == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"file://{rendezvous}", rank=0, world_size=1)


def load_upstream(root: Path, name: str) -> Any:
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"upstream_{name}", root / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def check_sampling(patched: Path, device: str, num_classes: int = 5000, sample_rate: float = 0.1) -> dict[str, Any]:
    """PartialFC_V2.sample of the patched upstream and FrozenPartialFC.sample, same seed and positives (needs a
    process group: PartialFC_V2 reads its rank)."""
    import torch

    from facedistill.heads.partial_fc import FrozenPartialFC

    losses, partial_fc_v2 = load_upstream(patched, "losses"), load_upstream(patched, "partial_fc_v2")
    margin = losses.CombinedMarginLoss(64, 1.0, 0.5, 0.0)
    upstream = partial_fc_v2.PartialFC_V2(margin, 32, num_classes, sample_rate, False).to(device)
    ours = FrozenPartialFC(num_classes, torch.randn(num_classes, 32), sample_rate=sample_rate).to(device)
    same = []
    for seed in range(3):
        labels = torch.randint(0, num_classes, (64, 1), generator=torch.Generator().manual_seed(seed)).to(device)
        index_positive = torch.ones_like(labels, dtype=torch.bool)
        torch.manual_seed(seed)
        upstream.sample(labels.clone(), index_positive)
        torch.manual_seed(seed)
        columns = ours.sample(labels.view(-1))
        same.append(bool(torch.equal(upstream.weight_index.cpu(), columns.cpu())))
    return {"device": device, "classes": num_classes, "sample_rate": sample_rate, "identical_draws": same}


def step_sampling(work: Path, size: dict[str, Any], device: str) -> dict[str, Any]:
    import torch

    single_rank_group(work, device)
    checks = [check_sampling(work / "arcface_torch", device, classes) for classes in size["sampling_classes"]]
    identical = all(all(check["identical_draws"]) for check in checks)
    info = {"checks": checks, "torch": torch.__version__, "device_name": device_name(device)}
    summary = ", ".join(f"{c['classes']} classes: {sum(c['identical_draws'])}/3 draws identical" for c in checks)
    if not identical:
        raise StepFailed(f"FrozenPartialFC drew other classes than PartialFC_V2 on {device}: {summary}", info)
    return {"summary": f"{summary} on {info['device_name']}", **info}


def device_name(device: str) -> str:
    import torch

    if device == "cuda":
        return torch.cuda.get_device_name(0)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def head_measurement(
    kind: str, patched: Path, classes: int, dim: int, rate: float, batch: int, warmup: int, steps: int, device: str
) -> dict[str, Any]:
    """One head alone as train_v2.py drives it: float32 embeddings from outside autocast (upstream's fp16 backbones
    return float32), the loss scaled by a GradScaler under fp16. PartialFC_V2 is updated by SGD with momentum
    (its weights are trained); the MD head's centres are frozen and have no update."""
    import torch
    import torch.nn.functional as F

    cuda = device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    generator = torch.Generator(device=device).manual_seed(0)
    embeddings = torch.randn(batch, dim, device=device, generator=generator, requires_grad=True)
    labels = torch.randint(0, classes, (batch,), device=device, generator=generator)
    teacher = F.normalize(torch.randn(batch, dim, device=device, generator=generator), dim=1)
    sync()
    before = torch.cuda.memory_allocated() if cuda else 0
    optimizer = None
    if kind == "arcface":
        losses, partial_fc_v2 = load_upstream(patched, "losses"), load_upstream(patched, "partial_fc_v2")
        margin = losses.CombinedMarginLoss(64, 1.0, 0.5, 0.0)
        head = partial_fc_v2.PartialFC_V2(margin, dim, classes, rate, False).to(device)
        optimizer = torch.optim.SGD(head.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    else:
        from facedistill.distill.base import MethodContext
        from facedistill.distill.margin_distillation import MarginDistillation, MarginDistillationParams

        # Built block by block on the device, as a teacher head is read: no float32 copy of the whole matrix.
        centres = torch.empty(classes, dim, dtype=torch.float16, device=device)
        for row in range(0, classes, 65536):
            block = torch.randn(min(65536, classes - row), dim, device=device, generator=generator)
            centres[row : row + block.shape[0]] = F.normalize(block, dim=1).half()
        context = MethodContext(classes, dim, local_centres=centres, typicality_max=0.95)
        params = MarginDistillationParams(preset="facedistill", scale=32.0, sample_rate=rate, centre_dtype="float16")
        head = MarginDistillation(params, context).to(device)
        del centres, context
    sync()
    held = (torch.cuda.memory_allocated() - before) if cuda else None
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    # On in the dry run too, so that the CPU runs the scaler's calls as the GPU does (at fp32 it only scales).
    scaler = torch.amp.GradScaler(device)
    times = []
    for step in range(warmup + steps):
        sync()
        started = time.perf_counter()
        if optimizer is None:
            loss = sum(head(embeddings, labels, teacher).values())
        else:
            loss = head(embeddings, labels.clone())
        scaler.scale(loss).backward()
        if optimizer is not None:  # the frozen MD head has nothing to step, and update() wants a step's inf check
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=False)
        embeddings.grad = None
        sync()
        if step >= warmup:  # the first steps allocate gradients and momentum, and pick kernels
            times.append(time.perf_counter() - started)
    peak = (torch.cuda.max_memory_allocated() - before) if cuda else None
    result = {
        "kind": kind, "classes": classes, "dim": dim, "sample_rate": rate, "batch": batch,
        "step_ms": 1000 * statistics.median(times), "held_gib": held / 2**30 if held is not None else None,
        "peak_gib": peak / 2**30 if peak is not None else None, "loss": float(loss.detach()),
    }  # fmt: skip
    del head, optimizer, loss
    if cuda:
        torch.cuda.empty_cache()
    if not math.isfinite(result["loss"]):
        raise StepFailed(f"{kind} at {classes} classes, rate {rate}: loss {result['loss']}", result)
    return result


def step_heads(work: Path, size: dict[str, Any], device: str) -> dict[str, Any]:
    single_rank_group(work, device)
    rows, ratios = [], []
    for classes in size["head_classes"]:
        for rate in size["head_rates"]:
            pair = {}
            for kind in ("arcface", "md"):
                args = (classes, size["head_dim"], rate, size["head_batch"], size["head_warmup"], size["head_steps"])
                pair[kind] = head_measurement(kind, work / "arcface_torch", *args, device)
                rows.append(pair[kind])
                print(json.dumps(pair[kind]), flush=True)
            ratio = {"classes": classes, "sample_rate": rate,
                     "step_md_over_arcface": pair["md"]["step_ms"] / pair["arcface"]["step_ms"]}  # fmt: skip
            if pair["md"]["peak_gib"] is not None:
                ratio["peak_memory_md_over_arcface"] = pair["md"]["peak_gib"] / pair["arcface"]["peak_gib"]
            ratios.append(ratio)
    parts = []
    for ratio in ratios:
        memory = ratio.get("peak_memory_md_over_arcface")
        where = f"{ratio['classes']:,} x {size['head_dim']} rate {ratio['sample_rate']}"
        memory_text = f", memory {memory:.2f}x" if memory is not None else ""
        parts.append(f"{where}: step {ratio['step_md_over_arcface']:.2f}x{memory_text}")
    return {"summary": "md / arcface " + "; ".join(parts), "rows": rows, "ratios": ratios}


# ---------------------------------------------------------------------------------------------- resume (d)


def csv_steps(path: Path) -> list[int]:
    if not path.exists():
        return []
    with open(path, newline="") as handle:
        return [int(row["step"]) for row in csv.DictReader(handle) if (row.get("step") or "").isdigit()]


def step_resume(work: Path, size: dict[str, Any], dry_run: bool, deadline: float) -> dict[str, Any]:
    """``facedistill distill`` killed (SIGKILL: a crash, not a clean stop) once its first checkpoint is on disk,
    then resumed: it must start from that checkpoint's step and finish at the planned one."""
    import torch

    data = work / "arcface_torch" / "data" / "synthetic"
    run_dir = work / "distill"
    planned = size["distill_steps"]
    sets = {
        "model.embedding_size": EMBEDDING, "data.batch_size": size["distill_batch"],
        "data.num_workers": size["distill_workers"], "train.max_steps": planned,
        "train.checkpoint_every": size["distill_every"], "train.log_every": 1, "train.export_onnx": "false",
        "train.amp": "none" if dry_run else "fp16", "run.device": "cpu" if dry_run else "cuda",
    }  # fmt: skip
    overrides = [item for key, value in sets.items() for item in ("--set", f"{key}={value}")]
    command = facedistill_cli(
        "distill", "--data", str(data), "--cache", str(data / "teacher"), "--output", str(run_dir), *overrides
    )
    print("+", " ".join(command), flush=True)
    log = open(work / "distill_first.log", "w")  # noqa: SIM115 (closed below)
    first = subprocess.Popen(command, cwd=work, env=child_environment(), stdout=log, stderr=subprocess.STDOUT,
                             start_new_session=True)  # fmt: skip
    checkpoint = run_dir / "last.pt"
    while not checkpoint.exists() and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    killed = first.poll() is None
    if killed:
        os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    log.close()
    print((work / "distill_first.log").read_text(errors="replace")[-3000:], flush=True)
    if not killed:
        raise StepFailed(f"the first run ended (exit {first.returncode}) before it could be killed after a checkpoint")
    if not checkpoint.exists():
        raise StepFailed("no checkpoint before the deadline")
    saved = int(torch.load(checkpoint, map_location="cpu", weights_only=True)["step"])
    logged_before = len(csv_steps(run_dir / "train.csv"))
    code, lines = run_with_deadline([*command, "--resume"], work, max(1.0, deadline - time.monotonic()))
    if code != 0:
        last = next((line for line in reversed(lines) if line.strip()), "")
        raise StepFailed(f"the resumed run {'timed out' if code is None else f'exited {code}'}: {last[:300]}")
    results = json.loads((run_dir / "results.json").read_text())
    resumed = csv_steps(run_dir / "train.csv")[logged_before:]
    info = {"planned": planned, "checkpoint_step": saved, "resumed_first_step": resumed[0] if resumed else None,
            "final_step": results["steps"], "images_per_second": results.get("images_per_second")}  # fmt: skip
    if not 0 < saved < planned:
        raise StepFailed(f"killed at checkpoint step {saved}, not inside (0, {planned})", info)
    if results["steps"] != planned or not resumed or resumed[0] != saved + 1 or resumed[-1] != planned:
        raise StepFailed(
            f"resumed from step {saved}: first logged step {info['resumed_first_step']}, finished at "
            f"{results['steps']} (planned {planned})",
            info,
        )
    return {"summary": f"killed after the checkpoint at step {saved}, resumed at {saved + 1}, finished at {planned}",
            **info}  # fmt: skip


# ------------------------------------------------------------------------------------------ bad record (e)


def step_bad_record(work: Path, size: dict[str, Any]) -> dict[str, Any]:
    """The worker's own stderr (torchrun's ``--log-dir``, beside the console) must hold the one ``error:`` line and
    no traceback; torchrun's launcher then prints its own failure summary, which is not the worker's."""
    timeout = size["bad_timeout"]
    logs = work / "bad_record_logs"
    command = torchrun("--log-dir", str(logs), "--tee", "3", "train_v2.py", "configs/gpu_check_bad")
    started = time.monotonic()
    code, _ = run_with_deadline(command, work / "arcface_torch", timeout)
    seconds = round(time.monotonic() - started, 1)
    stderr = sorted(logs.glob("*/attempt_0/0/stderr.log"))
    worker = stderr[0].read_text(errors="replace").splitlines() if stderr else []
    errors = [line for line in worker if line.startswith("error:")]
    info = {"exit": code, "seconds": seconds, "error_lines": errors,
            "traceback": any("Traceback (most recent call last)" in line for line in worker)}  # fmt: skip
    if code is None:
        raise StepFailed(f"train_v2.py did not stop in {timeout} s on a .rec with undecodable images (a hang)", info)
    if code == 0:
        raise StepFailed("train_v2.py finished on a .rec with undecodable images", info)
    if len(errors) != 1:
        raise StepFailed(f"exit {code} in {seconds} s with {len(errors)} 'error:' lines from the worker (want 1)", info)
    if info["traceback"]:
        raise StepFailed(f"exit {code} in {seconds} s, the worker printed a traceback beside {errors[0][:200]}", info)
    return {"summary": f"refused in {seconds} s: {errors[0][:200]}", **info}


# ------------------------------------------------------------------------------------------- orchestration


def run_step(name: str, work: Path, upstream: Path, dry_run: bool, timeout: float) -> dict[str, Any]:
    """In this (child) process: one step, its result written to work/steps/NAME.json."""
    size = DRY if dry_run else GPU
    device = "cpu" if dry_run else "cuda"
    deadline = time.monotonic() + timeout
    result: dict[str, Any]
    try:
        if name == "prepare":
            result = step_prepare(work, upstream, size, dry_run)
        elif name == "throughput":
            result = step_throughput(work, size, dry_run, deadline)
        elif name == "sampling":
            result = step_sampling(work, size, device)
        elif name == "heads":
            result = step_heads(work, size, device)
        elif name == "resume":
            result = step_resume(work, size, dry_run, deadline)
        elif name == "bad_record":
            result = step_bad_record(work, size)
        else:
            raise ValueError(f"unknown step {name}")
        result["passed"] = True
    except StepFailed as failure:
        extra = failure.args[1] if len(failure.args) > 1 and isinstance(failure.args[1], dict) else {}
        result = {"passed": False, "summary": str(failure.args[0]), **extra}
    except Exception as error:  # a bug or a refusal: the step fails, the others still run
        traceback.print_exc()
        result = {"passed": False, "summary": " ".join(f"{type(error).__name__}: {error}".split())[:500]}
    if "torch.distributed" in sys.modules:
        import torch.distributed as dist

        if dist.is_initialized():  # NCCL warns at exit about a group left undestroyed
            dist.destroy_process_group()
    path = work / "steps" / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, default=str))
    return result


def fresh_work(work: Path) -> None:
    """Empty the scratch folder, but only one this check made (or an empty one): it may be a path given by hand."""
    if work.exists() and any(work.iterdir()) and not (work / WORK_MARKER).exists():
        raise SystemExit(f"gpu_check: {work} is not empty and not a gpu_check scratch folder; name another --work")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    (work / WORK_MARKER).write_text("scratch of benchmarks/gpu_check.py; wiped at every run\n")


def orchestrate(args: argparse.Namespace) -> int:
    size = DRY if args.dry_run else GPU
    started = time.monotonic()
    deadline = started + size["budget"]
    work, results_dir = args.work.resolve(), args.results.resolve()
    fresh_work(work)
    results_dir.mkdir(parents=True, exist_ok=True)
    from importlib.metadata import PackageNotFoundError, version

    try:
        torch_version = version("torch")
    except PackageNotFoundError:
        torch_version = "unknown"
    report: dict[str, Any] = {
        "check": "benchmarks/gpu_check.sh" + (" --dry-run" if args.dry_run else ""),
        "mode": "dry-run (CPU, gloo, fp32, tiny sizes)" if args.dry_run else "GPU (NCCL, fp16)",
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "host": platform.node(), "cpus": os.cpu_count(),
        "python": platform.python_version(), "torch": torch_version, "upstream": str(args.upstream),
        "sizes": {k: v for k, v in size.items() if k != "timeouts"}, "steps": {},
    }  # fmt: skip
    json_path = results_dir / "gpu_check.json"
    lines = []
    for name in STEPS:
        step_started = time.monotonic()
        left = deadline - step_started
        prepared = report["steps"].get("prepare", {}).get("passed", False)
        if name in NEEDS_DATA and not prepared:
            result = {"passed": False, "summary": "not run: prepare failed"}
        elif name != "prepare" and not (work / "arcface_torch" / "train_v2.py").exists():
            result = {"passed": False, "summary": "not run: no patched checkout (prepare failed)"}
        elif left < 10:
            result = {"passed": False, "summary": f"not run: the check's {size['budget']} s budget is spent"}
        else:
            timeout = min(size["timeouts"][name], left)
            command = [sys.executable, str(Path(__file__).resolve()), "--step", name, "--work", str(work),
                       "--upstream", str(args.upstream), "--timeout", str(timeout)]  # fmt: skip
            if args.dry_run:
                command.append("--dry-run")
            print(f"\n===== gpu_check step {name} (deadline {timeout:.0f} s) =====", flush=True)
            # Its own deadline inside, and ours outside: a child stuck beyond both is stopped here.
            code, _ = run_with_deadline(command, REPO, timeout + 30)
            path = work / "steps" / f"{name}.json"
            if path.exists():
                result = json.loads(path.read_text())
            else:
                why = f"stopped after {timeout + 30:.0f} s" if code is None else f"exit {code}"
                result = {"passed": False, "summary": f"the step's process ended without a result ({why})"}
        result["seconds"] = round(time.monotonic() - step_started, 1)
        report["steps"][name] = result
        line = f"{'PASS' if result['passed'] else 'FAIL'} {name}: {result['summary']} ({result['seconds']:.0f} s)"
        lines.append(line)
        print(f"gpu_check: {line}", flush=True)
        json_path.write_text(json.dumps(report, indent=2, default=str))  # as it goes: a killed check keeps its steps
    passed = sum(report["steps"][name]["passed"] for name in STEPS)
    report["passed"] = passed == len(STEPS)
    report["seconds"] = round(time.monotonic() - started, 1)
    report["device_name"] = report["steps"].get("sampling", {}).get("device_name")
    json_path.write_text(json.dumps(report, indent=2, default=str))
    print("\n===== gpu_check summary =====")
    for line in lines:
        print(line)
    print(f"gpu_check: {passed}/{len(STEPS)} steps passed in {report['seconds']:.0f} s; {json_path}", flush=True)
    return 0 if report["passed"] else 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="CPU, gloo, fp32 and tiny sizes")
    parser.add_argument("--upstream", type=Path, required=True, help="upstream arcface_torch (unpatched) to copy")
    parser.add_argument("--results", type=Path, default=REPO / "bench_out" / "gpu_check")
    parser.add_argument("--work", type=Path, default=None, help="scratch (default: beside --results' default)")
    parser.add_argument("--preflight", action="store_true", help="only say, in one line, what is missing")
    parser.add_argument("--wheels", type=Path, default=REPO / ".gpu_check" / "wheels")
    parser.add_argument("--step", choices=STEPS, help=argparse.SUPPRESS)
    parser.add_argument("--timeout", type=float, default=600.0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.dry_run:
        # One thread per process, inherited by every child: on a loaded CPU (CI's two shared cores), OpenMP threads
        # that spin while their peers are descheduled make a MobileFaceNet step about 10 times slower.
        os.environ.setdefault("OMP_NUM_THREADS", "1")
    if args.preflight:
        problem = preflight(args.dry_run, args.upstream, args.wheels)
        if problem:
            print(problem, file=sys.stderr)
            raise SystemExit(1)
        return
    if args.work is None:
        args.work = REPO / "bench_out" / ("gpu_check_dry_work" if args.dry_run else "gpu_check_work")
    if args.step:
        result = run_step(args.step, args.work.resolve(), args.upstream.resolve(), args.dry_run, args.timeout)
        raise SystemExit(0 if result["passed"] else 1)
    raise SystemExit(orchestrate(args))


if __name__ == "__main__":
    main()
