"""How good are the teacher's class centres of small classes? MarginDistillation's targets, by images per identity.

MarginDistillation trains the student against each identity's teacher centre (the mean of its images' and mirrors'
embeddings, here centred by the mean embedding as ``teacher.subtract_mean`` does) with a margin set by the image's
cosine to that centre. An image is part of its own centre: with 2 images of an identity it is half of it, so its
cosine to the centre is inflated and its margin with it. This reads a training set's teacher cache and prints, per
group of identities by image count (and per training root): the cosine of each image to its own centre (what MD's
margin is computed from) and the margin it gets (``m = m_min + (m_max - m_min) * cos / max cos``, the dataset
normaliser), the cosine to the centre of the identity's *other* images (leave-one-out: how well the centre
represents an image it was not made from), and the cosine between the centre and its nearest other centre.

    # celeba299's 269 training identities plus celeba_extra's 2,760 (the cache learning_curve.py built for them)
    python benchmarks/centre_quality.py --train ../shared/data/celeba299 ../shared/data/celeba_extra \\
        --cache bench_out/extra/teacher_cache --out bench_out/extra \\
        --results benchmarks/results/centre_quality_celeba_extra_2026-12-07.json
"""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from facedistill.data.datasets import open_training_set
from facedistill.data.splits import read_identity_list
from facedistill.distill.margin_distillation import per_sample_margins
from facedistill.teachers.cache import TeacherCache

sys.path.insert(0, str(Path(__file__).resolve().parent))
import learning_curve  # noqa: E402  (its merged training folder: the set the study trains on)
import validation_study as study  # noqa: E402

GROUPS = ((2, 2), (3, 3), (4, 4), (5, 8), (9, 16), (17, 10**9))
M_MIN, M_MAX = 0.2, 0.5  # facedistill's and the paper's margin range


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", nargs="+", default=[str(study.SHARED / "celeba299")], help="identity folders")
    parser.add_argument("--exclude", default=str(study.SPLIT / "val_identities.txt"), help="('none': none)")
    parser.add_argument("--cache", type=Path, required=True, help="the teacher cache of that training set")
    parser.add_argument("--out", type=Path, default=Path("bench_out/extra"), help="for the merged folder")
    parser.add_argument("--results", type=Path, help="JSON (and a .md beside it)")
    return parser.parse_args(argv)


def image_statistics(cache: TeacherCache, labels: np.ndarray, num_classes: int) -> dict[str, np.ndarray]:
    """Per image: cosine to its own centre, to the centre of its class's other images, and the margin MD gives it;
    per class: nearest other centre's cosine. Centres and cosines are the cache's own (``mean_centres`` and
    ``typicality``, centred by the mean embedding as ``teacher.subtract_mean``), the margin MD's formula."""
    offset = cache.mean_embedding().float()
    centres = cache.mean_centres(labels, num_classes, offset=offset)
    typicality = cache.typicality(centres, labels, offset=offset)  # [N, 2]: images and mirrors
    margins = per_sample_margins(typicality[:, 0], M_MIN, M_MAX, normaliser=typicality.max())  # dataset normaliser
    # Leave-one-out needs the class sums before normalising (mean_centres keeps only their directions).
    views = F.normalize(torch.from_numpy(np.asarray(cache.embeddings[:], dtype=np.float32)), dim=2)
    own_sums = (views.sum(dim=1) - 2 * offset).double()
    index = torch.from_numpy(labels)
    sums = torch.zeros(num_classes, views.shape[2], dtype=torch.float64).index_add_(0, index, own_sums)
    others = F.normalize((sums[index] - own_sums).float(), dim=1)
    leave_one_out = (F.normalize(views[:, 0] - offset, dim=1) * others).sum(dim=1)
    similarity = centres @ centres.T
    similarity.fill_diagonal_(-2.0)
    return {
        "own": typicality[:, 0].numpy(),
        "leave_one_out": leave_one_out.numpy(),
        "md_margin": margins.numpy(),
        "nearest_other_centre": similarity.max(dim=1).values.numpy(),
        "normaliser": np.float32(typicality.max()),
    }


def group_rows(stats: dict[str, np.ndarray], labels: np.ndarray, roots: np.ndarray) -> list[dict[str, Any]]:
    counts = np.bincount(labels)
    per_image_count = counts[labels]
    rows = []
    names = sorted(set(roots))
    for root in [*names, "all"] if len(names) > 1 else names:
        for low, high in GROUPS:
            chosen = (per_image_count >= low) & (per_image_count <= high) & ((roots == root) | (root == "all"))
            if not chosen.any():
                continue
            classes = np.unique(labels[chosen])
            name = f"{low}" if low == high else f"{low}-{high}" if high < 10**9 else f"{low}+"
            rows.append({
                "root": root, "images_per_identity": name,
                "identities": len(classes), "images": int(chosen.sum()),
                "cos_own_centre": float(stats["own"][chosen].mean()),
                "md_margin": float(stats["md_margin"][chosen].mean()),
                "cos_leave_one_out": float(stats["leave_one_out"][chosen].mean()),
                "cos_nearest_other_centre": float(stats["nearest_other_centre"][classes].mean()),
            })  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    roots = args.train
    train = roots[0] if len(roots) == 1 else learning_curve.merged_training_folder(roots, args.out / "train_merged")
    exclude = None if args.exclude == "none" else read_identity_list(args.exclude)
    dataset = open_training_set(train, exclude=exclude)
    cache = TeacherCache(args.cache)
    cache.check(dataset)
    labels = np.asarray(dataset.labels)
    home = {identity: Path(root).name for root in roots for identity in (p.name for p in Path(root).iterdir())}
    image_roots = np.array([home[dataset.identities[label]] for label in labels])
    stats = image_statistics(cache, labels, dataset.num_classes)
    rows = group_rows(stats, labels, image_roots)
    report = {
        "machine": {"host": platform.node(), "torch": torch.__version__},
        "teacher": cache.teacher_id,
        "normaliser": float(stats["normaliser"]),
        "rows": rows,
    }
    lines = [
        f"teacher {cache.teacher_id}, centres centred by the mean embedding; margin normaliser (max cos, images and "
        f"mirrors) {report['normaliser']:.3f}",
        "",
        "| root | images / identity | identities | images | cos to own centre | MD margin | cos to centre of the "
        "others (leave-one-out) | cos to nearest other centre |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['root']} | {row['images_per_identity']} | {row['identities']} | {row['images']} | "
            f"{row['cos_own_centre']:.3f} | {row['md_margin']:.3f} | {row['cos_leave_one_out']:.3f} | "
            f"{row['cos_nearest_other_centre']:.3f} |"
        )
    study.publish(report, lines, args.results)
    return report


if __name__ == "__main__":
    main()
