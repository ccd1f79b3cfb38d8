"""Training-step throughput of MobileFaceNet on this CPU: bf16 autocast vs fp32, channels_last vs contiguous.

    python benchmarks/cpu_train_speed.py --batch-size 64

Prints images/s of a forward + backward + SGD step for each setting, measured in one run, and the ratio to eager
fp32 contiguous. (On CPUs without native bf16, AVX-512-BF16 or AMX, autocast bf16 is emulated and far slower.)
"""

from __future__ import annotations

import argparse
import time

import torch

from facedistill.models import create_model


def step_speed(batch_size: int, amp: bool, channels_last: bool, steps: int, warmup: int) -> float:
    torch.manual_seed(0)
    model = create_model("mobilefacenet", embedding_size=128).train()
    images = torch.randn(batch_size, 3, 112, 112)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    for index in range(warmup + steps):
        if index == warmup:
            started = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            embeddings = model(images)
        embeddings.float().pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    return steps * batch_size / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()
    results = {}
    for amp, channels_last in [(False, False), (False, True), (True, False), (True, True)]:
        name = f"{'bf16 autocast' if amp else 'fp32'}, {'channels_last' if channels_last else 'contiguous'}"
        results[name] = step_speed(args.batch_size, amp, channels_last, args.steps, args.warmup)
    baseline = results["fp32, contiguous"]
    for name, speed in results.items():
        print(f"{name:32s} {speed:7.1f} img/s   x{speed / baseline:.2f} vs eager fp32")


if __name__ == "__main__":
    main()
