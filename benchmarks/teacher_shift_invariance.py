"""How far the teacher's embedding moves when the student's image is shifted by a few pixels (``data.shift``).

``data.shift: K`` translates every training image by dy, dx drawn from [-K, K] (``random_shift``), and the teacher's
cached row of the unshifted image stays its target. That is only sound if the teacher barely notices the shift.
This script draws ``--identities`` training identities with ``--per-identity`` images each, embeds each image with
the teacher as it is, mirrored (the cache serves the mirror exactly), and through ``random_shift`` at each K, and
prints the mean cosine of each to the unshifted embedding, beside the mean cosine between two different images of
the same identity: a shift whose cosine stays near the mirror's and far above the same-identity level leaves the
target where it was.

    python benchmarks/teacher_shift_invariance.py [--shifts 2 4 8] [--identities 64] [--per-identity 4]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
import validation_study as study  # noqa: E402  (the study's shared-data paths and training split)

from facedistill.data.datasets import open_training_set  # noqa: E402
from facedistill.data.images import random_shift  # noqa: E402
from facedistill.data.splits import read_identity_list  # noqa: E402
from facedistill.teachers import create_teacher  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", default=str(study.SHARED / "celeba299"))
    parser.add_argument("--exclude", default=str(study.SPLIT / "val_identities.txt"), help="identity list, or none")
    parser.add_argument("--teacher", default="sface")
    parser.add_argument("--shifts", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--identities", type=int, default=64)
    parser.add_argument("--per-identity", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--results", type=Path, help="write the figures here as JSON")
    return parser.parse_args(argv)


def draw_images(labels: np.ndarray, identities: int, per_identity: int, seed: int) -> list[int]:
    """``per_identity`` image indices of each of ``identities`` identities that have that many, seeded."""
    rng = np.random.default_rng(seed)
    eligible = [label for label in np.unique(labels) if (labels == label).sum() >= per_identity]
    if len(eligible) < identities:
        raise SystemExit(f"only {len(eligible)} identities have {per_identity} images; lower --identities")
    chosen = rng.choice(eligible, size=identities, replace=False)
    return [int(i) for label in chosen for i in rng.choice(np.flatnonzero(labels == label), per_identity, False)]


def main(argv: list[str] | None = None) -> dict[str, float]:
    args = parse_args(argv)
    exclude = None if args.exclude == "none" else read_identity_list(args.exclude)
    dataset = open_training_set(args.train, exclude=exclude)
    indices = draw_images(dataset.labels, args.identities, args.per_identity, args.seed)
    teacher = create_teacher(args.teacher)
    views = ["mirror", *(f"shift {k}" for k in args.shifts)]
    cosines: dict[str, list[torch.Tensor]] = {view: [] for view in views}
    originals = []
    generator = torch.Generator().manual_seed(args.seed)
    for start in tqdm(range(0, len(indices), args.batch_size), desc="teacher views", unit="batch"):
        images = torch.stack([dataset[i][0] for i in indices[start : start + args.batch_size]])
        original = F.normalize(teacher.embed(images), dim=1)
        originals.append(original)
        batches = {"mirror": images.flip(-1)}
        batches.update({f"shift {k}": random_shift(images, generator, k) for k in args.shifts})
        for view, batch in batches.items():
            cosines[view].append((F.normalize(teacher.embed(batch), dim=1) * original).sum(1))
    # draw_images lists each identity's images together: one [per_identity, dim] group per identity.
    grouped = torch.cat(originals).view(args.identities, args.per_identity, -1)
    blocks = grouped @ grouped.transpose(1, 2)
    off_diagonal = ~torch.eye(args.per_identity, dtype=torch.bool)
    figures = {view: torch.cat(values).mean().item() for view, values in cosines.items()}
    figures["same identity, another image"] = blocks[:, off_diagonal].mean().item()
    print(f"teacher {args.teacher}: mean cosine to the embedding of the unshifted image, {len(indices)} images")
    for view, value in figures.items():
        print(f"  {view:30s} {value:.4f}  ({np.degrees(np.arccos(min(value, 1.0))):.1f} deg)")
    if args.results:
        args.results.write_text(json.dumps({"images": len(indices), "teacher": args.teacher, **figures}, indent=1))
    return figures


if __name__ == "__main__":
    main()
