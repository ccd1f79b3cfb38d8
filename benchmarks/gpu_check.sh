#!/usr/bin/env bash
# The one prepared device check (issue 18): on a lent GPU, the patched upstream train_v2.py with NCCL and fp16 for
# the framework's ArcFace and facedistill's validated MarginDistillation (img/s of both and their ratio), and
# FrozenPartialFC's sampled classes against PartialFC_V2's on CUDA. Never a CI test.
#   bash benchmarks/gpu_check.sh              # on the GPU machine (about 5 minutes)
#   bash benchmarks/gpu_check.sh --dry-run    # the same steps on a CPU: gloo, fp32, small sizes
# Needs facedistill installed with [sface] and the upstream snapshot at ../shared/upstream/arcface_torch.
set -euo pipefail
cd "$(dirname "$0")/.."
workdir=bench_out/gpu_check
if [[ "${1:-}" == "--dry-run" ]]; then workdir=bench_out/gpu_check_dry; fi
exec python benchmarks/gpu_check.py --workdir "$workdir" "$@"
