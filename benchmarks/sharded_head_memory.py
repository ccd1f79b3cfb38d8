"""Memory per rank and step time of ShardedMarginHead with frozen centres, 1 process against N (gloo, CPU).

Each world size runs in fresh processes (so the resident-set figures do not carry over), each rank generating only
its own shard of random centres, as a training run would load only its slice. Per rank it reports the bytes of
centre storage the head holds, the resident-set growth from building the head, the peak resident set during the
steps, and the mean time of a forward + backward at the global batch (per-sample margins, as MarginDistillation).
The machine's cores are split evenly between the ranks, so the step times compare the same hardware: here the
ranks share the cores, so the ratio of step times shows the cost of the collectives, not the speed-up that N
devices would give (each rank computes 1/N of the logits).

A step at a million classes takes tens of seconds on two cores, so by default the step is timed on a head of
``--step-classes`` classes (time per rank grows linearly with the classes it holds); ``--step-classes 0`` times the
full head.

    python benchmarks/sharded_head_memory.py --classes 1000000 --dim 512 --batch 256
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from facedistill.heads.sharded import ShardedMarginHead, shard_range


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: reset VmHWM to the current resident set
        return True
    except OSError:
        return False


def _frozen_head(num_classes: int, dim: int, rank: int, world: int, generator: torch.Generator) -> ShardedMarginHead:
    start, end = shard_range(num_classes, rank, world)
    centres = torch.randn(end - start, dim, generator=generator)  # only this rank's shard ever exists here
    return ShardedMarginHead(num_classes, dim, scale=64.0, m2=0.2, learnable=False, local_centres=centres)


def _worker(rank: int, world: int, rendezvous: str, args: argparse.Namespace, out_dir: str) -> None:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group(
        "gloo", init_method=rendezvous, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=600)
    )
    try:
        generator = torch.Generator().manual_seed(rank)
        rss_before = _status_kib("VmRSS")
        head = _frozen_head(args.classes, args.dim, rank, world, generator)
        rss_after = _status_kib("VmRSS")
        classes_held, held_bytes = head.class_end - head.class_start, head.held_bytes()
        step_classes = args.step_classes or args.classes
        if step_classes != args.classes:
            del head
            head = _frozen_head(step_classes, args.dim, rank, world, generator)

        local_batch = args.batch // world
        embeddings = torch.randn(local_batch, args.dim, generator=generator, requires_grad=True)
        labels = torch.randint(0, step_classes, (local_batch,), generator=generator)
        margins = 0.2 + 0.3 * torch.rand(local_batch, generator=generator)
        peak_reset = _reset_peak_rss()
        times = []
        for step in range(args.steps + 1):
            dist.barrier()
            tick = time.perf_counter()
            head(embeddings, labels, margins)["margin"].backward()
            dist.barrier()
            if step:  # the first step warms up the allocator and thread pools
                times.append(time.perf_counter() - tick)
            embeddings.grad = None
        result = {
            "rank": rank,
            "classes_held": classes_held,
            "held_bytes": held_bytes,
            "step_classes": step_classes,
            "rss_delta_bytes": (rss_after - rss_before) * 1024,
            "peak_rss_bytes": _status_kib("VmHWM") * 1024 if peak_reset else None,
            "step_seconds": statistics.mean(times),
            "threads": torch.get_num_threads(),
        }
        Path(out_dir, f"world{world}_rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def run_world(world: int, args: argparse.Namespace, out_dir: str) -> list[dict]:
    # A file of the world's own: no port to probe, so none that another program can take first.
    with tempfile.TemporaryDirectory() as meeting:
        rendezvous = f"file://{meeting}/rendezvous"
        mp.start_processes(_worker, args=(world, rendezvous, args, out_dir), nprocs=world, join=True)
    return [json.loads(Path(out_dir, f"world{world}_rank{r}.json").read_text()) for r in range(world)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--classes", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--batch", type=int, default=256, help="global batch, split evenly over the ranks")
    parser.add_argument("--steps", type=int, default=2, help="timed forward + backward steps after one warm-up")
    parser.add_argument(
        "--step-classes", type=int, default=100_000, help="classes of the head whose step is timed (0: --classes)"
    )
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--out", type=Path, default=None, help="also write the figures to this JSON file")
    args = parser.parse_args()
    if any(args.batch % world for world in args.worlds):
        parser.error("--batch must divide evenly over every world size")

    started = time.perf_counter()
    results: dict[int, list[dict]] = {}
    with tempfile.TemporaryDirectory() as out_dir:
        for world in args.worlds:
            results[world] = run_world(world, args, out_dir)

    gib = 2**30
    print(
        f"frozen centres {args.classes} x {args.dim} float32 ({args.classes * args.dim * 4 / gib:.2f} GiB), "
        f"global batch {args.batch}, {os.cpu_count()} cores split over the ranks, torch {torch.__version__}"
    )
    step_classes = args.step_classes or args.classes
    print(f"step: forward + backward over {step_classes} classes; peak RSS while stepping")
    print("world rank classes    held GiB  RSS delta GiB  peak RSS GiB  step s  threads")
    for world, ranks in results.items():
        for r in ranks:
            peak = f"{r['peak_rss_bytes'] / gib:12.2f}" if r["peak_rss_bytes"] is not None else f"{'n/a':>12}"
            print(
                f"{world:5d} {r['rank']:4d} {r['classes_held']:8d} {r['held_bytes'] / gib:10.3f} "
                f"{r['rss_delta_bytes'] / gib:14.3f} {peak} {r['step_seconds']:7.2f} {r['threads']:8d}"
            )
    base = results[args.worlds[0]][0]
    for world in args.worlds[1:]:
        largest = max(results[world], key=lambda r: r["held_bytes"])
        slowest = max(r["step_seconds"] for r in results[world])
        print(
            f"world {world} / world {args.worlds[0]} (largest shard): held bytes "
            f"{largest['held_bytes'] / base['held_bytes']:.3f}, RSS delta "
            f"{largest['rss_delta_bytes'] / base['rss_delta_bytes']:.3f}, "
            f"step time {slowest / base['step_seconds']:.3f}"
        )
    print(f"total wall time {time.perf_counter() - started:.1f} s")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results}))


if __name__ == "__main__":
    main()
