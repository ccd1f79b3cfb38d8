"""The device check of the arcface_torch plugin: one GPU, NCCL, fp16, ArcFace against MarginDistillation validated.

Run by ``benchmarks/gpu_check.sh`` (the one prepared script for a lent GPU; never a CI test). Two checks:

1. Sampling: FrozenPartialFC draws the same classes as the framework's PartialFC_V2 for the same seed, on the
   device (upstream draws its uniforms with the CPU generator and moves them; so does facedistill).
2. Throughput: the patched upstream ``train_v2.py`` on one process (NCCL, fp16 autocast on a GPU) with
   ``celeba299_mbf`` (the framework's ArcFace) and ``celeba299_mbf_md`` (facedistill's validated recipe, the
   angle term included) on generated faces packed as ``.rec`` and cached with SFace; interleaved rounds (A B A B)
   of each; prints both img/s (medians) and their ratio.

``--dry-run`` runs both on the CPU (gloo, fp32, small sizes) so the script is checked anywhere:

    python benchmarks/gpu_check.py --dry-run --workdir bench_out/gpu_check_dry
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from arcface_torch_cpu import (  # noqa: E402  (a sibling script)
    bench_recipe,
    check,
    free_port,
    patched_checkout,
    speed_round,
    torchrun,
)

SIZES = {"dry": {"identities": 12, "images": 8, "batch": 16, "samples": 2, "rounds": 1},
         "gpu": {"identities": 2000, "images": 20, "batch": 128, "samples": 6, "rounds": 2}}  # fmt: skip


def check_sampling(patched: Path, device: str, num_classes: int = 5000, sample_rate: float = 0.1) -> dict[str, Any]:
    """PartialFC_V2.sample of the patched upstream and FrozenPartialFC.sample, same seed and positives."""
    import torch
    import torch.distributed as dist

    from facedistill.heads.partial_fc import FrozenPartialFC

    if not dist.is_initialized():
        backend = "nccl" if device == "cuda" else "gloo"
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    modules = {}
    for name in ("losses", "partial_fc_v2"):
        spec = importlib.util.spec_from_file_location(f"upstream_{name}", patched / f"{name}.py")
        assert spec is not None and spec.loader is not None
        modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(modules[name])
    margin = modules["losses"].CombinedMarginLoss(64, 1.0, 0.5, 0.0)
    upstream = modules["partial_fc_v2"].PartialFC_V2(margin, 32, num_classes, sample_rate, False).to(device)
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


def prepare(workdir: Path, size: dict[str, int]) -> Path:
    """A patched checkout with generated faces packed into ``data/synthetic`` and their SFace cache."""
    from facedistill.data.synthetic import write_identity_folders

    root = patched_checkout(workdir)
    facedistill = [sys.executable, "-m", "facedistill.cli"]
    faces = workdir / "faces"
    if not faces.exists():
        write_identity_folders(faces, size["identities"], size["images"])
    if not (root / "data" / "synthetic" / "train.rec").exists():
        check([*facedistill, "pack", str(faces), "data/synthetic"], cwd=root)
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("bench_out/gpu_check"))
    parser.add_argument("--dry-run", action="store_true", help="CPU, gloo, fp32 and small sizes")
    args = parser.parse_args()
    import torch

    device = "cpu" if args.dry_run else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here: run with --dry-run on a CPU")
    size = SIZES["dry" if args.dry_run else "gpu"]
    workdir = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    root = prepare(workdir, size)
    report: dict[str, Any] = {"sampling": check_sampling(root, device)}
    print("sampling:", json.dumps(report["sampling"]), flush=True)

    classes, images = size["identities"], size["identities"] * size["images"]
    common = {
        "rec": "data/synthetic", "num_classes": classes, "num_image": images, "batch_size": size["batch"],
        "num_epoch": 1 + (size["samples"] + 2) * 10 * size["batch"] // images, "verbose": 10**9, "frequent": 10,
        "val_targets": [], "fp16": not args.dry_run, "num_workers": 2 if args.dry_run else 8,
        "teacher_cache": "data/synthetic/teacher_sface", "output": "work_dirs/gpu_check",
    }  # fmt: skip
    recipes = {
        "arcface": bench_recipe(root, "celeba299_mbf", "_gpu", common),
        "md": bench_recipe(root, "celeba299_mbf_md", "_gpu", common),
    }
    check(torchrun(1, "-m", "facedistill.cli", "arcface-torch", "cache-teacher", recipes["md"]), root)
    speeds: dict[str, list[float]] = {name: [] for name in recipes}
    for _ in range(size["rounds"]):
        for name, recipe in recipes.items():
            speeds[name] += speed_round(root, 1, recipe, size["samples"])
    medians = {name: statistics.median(values) for name, values in speeds.items()}
    report.update(speeds=speeds, medians=medians, ratio=medians["md"] / medians["arcface"], device=device)
    if device == "cuda":
        report["gpu"] = torch.cuda.get_device_name(0)
    (workdir / "gpu_check.json").write_text(json.dumps(report, indent=2))
    print(f"arcface {medians['arcface']:.1f} img/s, md {medians['md']:.1f} img/s, md / arcface {report['ratio']:.3f}")
    if not all(report["sampling"]["identical_draws"]):
        raise SystemExit("FrozenPartialFC drew other classes than PartialFC_V2 for the same seed")


if __name__ == "__main__":
    main()
