"""Training-step throughput of MobileFaceNet-128 at 112x112 on this CPU, each setting against eager fp32.

    python benchmarks/cpu_train_speed.py                 # batch 128: fp32/bf16 x contiguous/channels_last
    python benchmarks/cpu_train_speed.py --compile       # adds torch.compile (inductor) on top of channels_last

Prints images/s of a forward + backward + SGD step for each setting, measured in one run, and the ratio to eager
fp32 contiguous (the baseline of the speed target: >= 2.0x). bf16 autocast only pays on CPUs with native bf16
(AVX-512-BF16 or AMX); elsewhere it is emulated and far slower, which is why the training loop's ``amp: auto``
picks fp32 there. torch.compile's one-off warm-up (graph capture and C++ compilation of forward and backward) is
printed separately: on a 2-core CPU it can exceed a short run's whole training time.
"""

from __future__ import annotations

import argparse
import time

import torch

from facedistill.models import create_model
from facedistill.train.loop import resolve_amp


def step_speed(
    batch_size: int, amp: bool, channels_last: bool, steps: int, warmup: int, compile_model: bool = False
) -> tuple[float, float]:
    """(images/s over ``steps`` timed steps, seconds spent in the ``warmup`` steps)."""
    torch.manual_seed(0)
    model = create_model("mobilefacenet", embedding_size=128).train()
    images = torch.randn(batch_size, 3, 112, 112)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    forward = torch.compile(model) if compile_model else model
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    started = time.perf_counter()
    for index in range(warmup + steps):
        if index == warmup:
            warmup_seconds = time.perf_counter() - started
            started = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            embeddings = forward(images)
        embeddings.float().pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    return steps * batch_size / (time.perf_counter() - started), warmup_seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--skip-bf16", action="store_true", help="skip the bf16 rows (slow without native bf16)")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile + channels_last")
    args = parser.parse_args()
    auto = resolve_amp("auto", torch.device("cpu"))
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {torch.backends.cpu.get_cpu_capability()}, "
        f"train.amp=auto picks {auto or 'fp32'}, batch {args.batch_size}"
    )
    settings = [(False, False, False), (False, True, False)]
    if not args.skip_bf16:
        settings += [(True, False, False), (True, True, False)]
    if args.compile:
        settings.append((False, True, True))
    results = {}
    for amp, channels_last, compile_model in settings:
        name = f"{'bf16 autocast' if amp else 'fp32'}, {'channels_last' if channels_last else 'contiguous'}"
        name += ", torch.compile" if compile_model else ""
        results[name] = step_speed(args.batch_size, amp, channels_last, args.steps, args.warmup, compile_model)
    baseline = results["fp32, contiguous"][0]
    for name, (speed, warmup_seconds) in results.items():
        print(f"{name:40s} {speed:7.1f} img/s   x{speed / baseline:.2f} vs eager fp32   warm-up {warmup_seconds:.0f} s")


if __name__ == "__main__":
    main()
