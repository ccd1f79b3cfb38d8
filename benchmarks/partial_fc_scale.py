"""MarginDistillation's head at millions of identities against arcface_torch's own PartialFC_V2 ArcFace head.

2,000,000 x 512 class centres, sharded over gloo processes on the CPU, batch 128 per rank, sample_rate 0.1 and
1.0. For each head and setting it measures, in the same run:

- memory per rank held by the head during training: the peak resident set (VmHWM, reset after the head is built)
  minus the resident set before the head existed, so imports and the batch are not counted;
- the step time: forward, backward and (ArcFace only: it has parameters) the SGD-with-momentum update.

The MarginDistillation head is ``facedistill.heads.partial_fc.FrozenPartialFC`` driven by the method itself
(per-sample margins from the teacher's cosine, dataset normaliser), centres stored in float16. The ArcFace head is
the framework's own ``PartialFC_V2(CombinedMarginLoss(64, 1, 0.5, 0))`` from ../shared/upstream/arcface_torch,
patched to run on CPUs exactly as ``facedistill arcface-torch patch`` does, trained with SGD (momentum 0.9, weight
decay 5e-4) as ``train_v2.py`` trains it. MarginDistillation is also measured with 1 process, to show its memory
per rank scaling as 1 / world.

    python benchmarks/partial_fc_scale.py --out bench_out/partial_fc_scale [--classes 2000000] [--steps 3]
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

REPO = Path(__file__).resolve().parents[1]
UPSTREAM = REPO.parent / "shared" / "upstream" / "arcface_torch"


def _status(key: str) -> int:
    """A /proc/self/status memory figure in bytes (VmRSS, VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident set


def _patched_upstream(directory: Path) -> Path:
    """A copy of upstream arcface_torch with facedistill's patches applied (CPU-capable PartialFC_V2)."""
    from facedistill.arcface_torch.patching import apply

    root = directory / "arcface_torch"
    shutil.copytree(UPSTREAM, root)
    for path in [root, *root.rglob("*")]:
        path.chmod(path.stat().st_mode | 0o200)
    apply(root)
    return root


def _load(root: Path, name: str):  # noqa: ANN202
    spec = importlib.util.spec_from_file_location(f"upstream_{name}", root / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _build(kind: str, classes: int, dim: int, rate: float, rank: int, world: int, upstream: Path):  # noqa: ANN202
    from facedistill.distill.base import MethodContext
    from facedistill.distill.margin_distillation import MarginDistillation, MarginDistillationParams
    from facedistill.heads.sharded import shard_range

    if kind == "arcface":
        losses, pfc = _load(upstream, "losses"), _load(upstream, "partial_fc_v2")
        head = pfc.PartialFC_V2(losses.CombinedMarginLoss(64, 1.0, 0.5, 0.0), dim, classes, rate, False)
        optimizer = torch.optim.SGD(head.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
        return head, optimizer
    start, end = shard_range(classes, rank, world)
    generator = torch.Generator().manual_seed(rank)
    # Built block by block, as a teacher head is read shard by shard: no float32 copy of the whole block exists.
    local = torch.empty(end - start, dim, dtype=torch.float16)
    for row in range(0, end - start, 65536):
        block = torch.randn(min(65536, end - start - row), dim, generator=generator)
        local[row : row + block.shape[0]] = torch.nn.functional.normalize(block, dim=1).half()
    context = MethodContext(classes, dim, local_centres=local, typicality_max=0.95, shard_heads=world > 1)
    params = MarginDistillationParams(sample_rate=rate, centre_dtype="float16")
    return MarginDistillation(params, context), None


def _rank_measurement(rank: int, world: int, job: dict) -> dict[str, object]:
    torch.manual_seed(1234 + rank)
    batch, dim, classes = job["batch"], job["dim"], job["classes"]
    embeddings = torch.randn(batch, dim, requires_grad=True)
    teacher = torch.randn(batch, dim)
    labels = torch.randint(0, classes, (batch,))
    gc.collect()
    before = _status("VmRSS")
    head, optimizer = _build(job["kind"], classes, dim, job["rate"], rank, world, Path(job["upstream"]))
    gc.collect()
    held = _status("VmRSS") - before
    _reset_peak()
    times = []
    for step in range(job["steps"] + 1):
        dist.barrier()
        started = time.perf_counter()
        if optimizer is None:
            loss = sum(head(embeddings, labels, teacher).values())
        else:
            loss = head(embeddings, labels.clone())
        loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=False)
        embeddings.grad = None
        dist.barrier()
        if step:  # the first step allocates gradients and optimiser state: warm-up
            times.append(time.perf_counter() - started)
    return dict(
        held_bytes=held,
        peak_bytes=_status("VmHWM") - before,
        step_seconds=statistics.median(times),
        loss=float(loss.detach()),
    )


def _worker(rank: int, world: int, job: dict, out: str) -> None:
    result: dict[str, object] = {"rank": rank}
    try:
        torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))
        # A file in the world's own directory: no port to probe, so none that another program can take first.
        dist.init_process_group("gloo", init_method=f"file://{out}/rendezvous", rank=rank, world_size=world)
        result.update(_rank_measurement(rank, world, job))
        # The heads hold the process group; gloo aborts the process ("terminate called without an active
        # exception") when they outlive it, so they are gone (the measurement returned) before it is destroyed.
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()
    except Exception:
        result["error"] = traceback.format_exc()
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))


def measure(job: dict, world: int) -> dict:
    """One head on ``world`` processes."""
    with tempfile.TemporaryDirectory() as out:
        mp.start_processes(_worker, args=(world, job, out), nprocs=world, join=True, start_method="spawn")
        ranks = [json.loads(Path(out, f"rank{rank}.json").read_text()) for rank in range(world)]
    errors = [r["error"] for r in ranks if "error" in r]
    if errors:
        raise RuntimeError("\n".join(errors))
    return {
        "kind": job["kind"],
        "sample_rate": job["rate"],
        "world": world,
        "peak_gib_per_rank": max(r["peak_bytes"] for r in ranks) / 2**30,
        "held_gib_per_rank": max(r["held_bytes"] for r in ranks) / 2**30,
        "step_seconds": max(r["step_seconds"] for r in ranks),
        "loss": ranks[0]["loss"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "bench_out" / "partial_fc_scale")
    parser.add_argument("--classes", type=int, default=2_000_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--batch", type=int, default=128, help="per rank")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--heads", default="margin_distillation,arcface", help="comma-separated; the ratios need both")
    args = parser.parse_args()
    heads = args.heads.split(",")
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        upstream = _patched_upstream(Path(scratch))
        base = {"classes": args.classes, "dim": args.dim, "batch": args.batch, "steps": args.steps,
                "upstream": str(upstream)}  # fmt: skip
        plan = [(kind, rate, 2) for kind in heads for rate in (0.1, 1.0)]
        if "margin_distillation" in heads:
            plan += [("margin_distillation", rate, 1) for rate in (0.1, 1.0)]
        for kind, rate, world in plan:
            row = measure({**base, "kind": kind, "rate": rate}, world)
            rows.append(row)
            print(json.dumps(row), flush=True)
    table = {(r["kind"], r["sample_rate"], r["world"]): r for r in rows}
    ratios: dict[str, dict[str, float]] = {}
    for rate in (0.1, 1.0):
        md, arc = table.get(("margin_distillation", rate, 2)), table.get(("arcface", rate, 2))
        entry = ratios.setdefault(str(rate), {})
        if md and ("margin_distillation", rate, 1) in table:
            one = table[("margin_distillation", rate, 1)]["peak_gib_per_rank"]
            entry["md_memory_1_over_2_processes"] = one / md["peak_gib_per_rank"]
        if md and arc:
            entry["memory_md_over_arcface"] = md["peak_gib_per_rank"] / arc["peak_gib_per_rank"]
            entry["step_md_over_arcface"] = md["step_seconds"] / arc["step_seconds"]
    summary = {
        "command": "python benchmarks/partial_fc_scale.py " + " ".join(sys.argv[1:]),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}",
        "classes": args.classes, "dim": args.dim, "batch_per_rank": args.batch, "steps": args.steps,
        "rows": rows, "ratios": ratios,
    }  # fmt: skip
    (args.out / "results.json").write_text(json.dumps(summary, indent=2))
    lines = [
        f"# {args.classes:,} x {args.dim} centres, batch {args.batch} per rank, gloo on CPU",
        "",
        f"Command: `{summary['command']}`  ",
        f"Machine: {summary['machine']}",
        "",
        "| head | sample_rate | processes | memory per rank (GiB, step peak) | held after building (GiB) | step (s) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        memory, held, seconds = r["peak_gib_per_rank"], r["held_gib_per_rank"], r["step_seconds"]
        lines.append(f"| {r['kind']} | {r['sample_rate']} | {r['world']} | {memory:.2f} | {held:.2f} | {seconds:.2f} |")
    lines.append("")
    for rate, values in ratios.items():
        parts = []
        if "memory_md_over_arcface" in values:
            parts.append(
                f"MD / ArcFace memory per rank **{values['memory_md_over_arcface']:.3f}** (target <= 0.35), step time "
                f"**{values['step_md_over_arcface']:.3f}** (target <= 1)"
            )
        if "md_memory_1_over_2_processes" in values:
            parts.append(
                f"MD memory 1 process / 2 processes {values['md_memory_1_over_2_processes']:.2f} (2 = 1/world)"
            )
        lines.append(f"- sample_rate {rate}: " + "; ".join(parts))
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
