"""Generated face-like identities, for the demo, tests and benchmarks that must run without real data.

Each identity is a fixed random drawing (face oval, eyes, brows, nose, mouth, skin and hair colours, a texture);
each image of it is a new rendering with pose jitter, lighting, blur, noise and an occasional occluder, so that
recognising identities across images is learnable but not trivial.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

SIZE = 112


def _identity(rng: np.random.Generator) -> dict[str, np.ndarray | float]:
    return {
        "skin": rng.uniform(60, 230, 3),
        "hair": rng.uniform(0, 200, 3),
        "eyes": rng.uniform(0, 255, 3),
        "face_w": rng.uniform(30, 44),
        "face_h": rng.uniform(42, 54),
        "eye_dx": rng.uniform(14, 22),
        "eye_y": rng.uniform(44, 54),
        "eye_r": rng.uniform(3, 7),
        "brow_tilt": rng.uniform(-0.4, 0.4),
        "nose_len": rng.uniform(8, 18),
        "mouth_w": rng.uniform(10, 22),
        "mouth_y": rng.uniform(80, 92),
        "smile": rng.uniform(-6, 6),
        "hair_h": rng.uniform(6, 26),
        "texture": rng.normal(0, 1, (8, 8, 3)),
    }


def render_identity(identity: dict, rng: np.random.Generator) -> np.ndarray:
    """One 112x112 RGB uint8 image of ``identity`` under random nuisance."""
    canvas = np.full((SIZE, SIZE, 3), rng.uniform(0, 255, 3), dtype=np.float32)
    cx, cy = 56.0, 60.0
    cv2.ellipse(
        canvas,
        (int(cx), int(cy - identity["face_h"] * 0.6)),
        (int(identity["face_w"] + 4), int(identity["hair_h"] + 14)),
        0,
        180,
        360,
        identity["hair"].tolist(),
        -1,
    )
    cv2.ellipse(
        canvas,
        (int(cx), int(cy)),
        (int(identity["face_w"]), int(identity["face_h"])),
        0,
        0,
        360,
        identity["skin"].tolist(),
        -1,
    )
    texture = cv2.resize(identity["texture"].astype(np.float32), (SIZE, SIZE), interpolation=cv2.INTER_CUBIC)
    mask = np.zeros((SIZE, SIZE), np.float32)
    cv2.ellipse(mask, (int(cx), int(cy)), (int(identity["face_w"]), int(identity["face_h"])), 0, 0, 360, 1.0, -1)
    canvas += texture * 18 * mask[..., None]
    for side in (-1, 1):
        ex, ey = cx + side * identity["eye_dx"], identity["eye_y"]
        cv2.circle(canvas, (int(ex), int(ey)), int(identity["eye_r"]) + 2, (245, 245, 245), -1)
        cv2.circle(canvas, (int(ex), int(ey)), int(identity["eye_r"]), identity["eyes"].tolist(), -1)
        tilt = identity["brow_tilt"] * side * 10
        cv2.line(
            canvas,
            (int(ex - 8), int(ey - 10 + tilt)),
            (int(ex + 8), int(ey - 10 - tilt)),
            identity["hair"].tolist(),
            2,
        )
    cv2.line(
        canvas,
        (int(cx), int(identity["eye_y"] + 4)),
        (int(cx), int(identity["eye_y"] + identity["nose_len"])),
        (identity["skin"] * 0.6).tolist(),
        2,
    )
    mouth = np.array(
        [
            [cx - identity["mouth_w"], identity["mouth_y"]],
            [cx, identity["mouth_y"] + identity["smile"]],
            [cx + identity["mouth_w"], identity["mouth_y"]],
        ],
        np.int32,
    )
    cv2.polylines(canvas, [mouth], False, (120, 30, 40), 3)

    angle, scale = rng.normal(0, 6), rng.uniform(0.92, 1.08)
    matrix = cv2.getRotationMatrix2D((cx, cy), angle, scale)
    matrix[:, 2] += rng.normal(0, 2.5, 2)
    canvas = cv2.warpAffine(canvas, matrix, (SIZE, SIZE), borderMode=cv2.BORDER_REFLECT)
    canvas = canvas * rng.uniform(0.7, 1.3) + rng.uniform(-30, 30)
    canvas = canvas * (1 + rng.normal(0, 0.08, 3))
    if rng.random() < 0.5:
        canvas = cv2.GaussianBlur(canvas, (0, 0), rng.uniform(0.5, 1.6))
    if rng.random() < 0.25:
        x, y = rng.integers(0, SIZE - 30, 2)
        canvas[y : y + rng.integers(12, 30), x : x + rng.integers(12, 30)] = rng.uniform(0, 255, 3)
    canvas += rng.normal(0, 6, canvas.shape)
    return np.clip(canvas, 0, 255).astype(np.uint8)


def write_identity_folders(
    root: str | Path, identities: int, images_per_identity: int, seed: int = 0, first_identity: int = 0
) -> Path:
    """Write ``root/id_XXXXX/NNN.jpg``; ``first_identity`` keeps held-out identities distinct from training ones."""
    root = Path(root)
    for number in range(first_identity, first_identity + identities):
        rng = np.random.default_rng([seed, number])
        identity = _identity(rng)
        folder = root / f"id_{number:05d}"
        folder.mkdir(parents=True, exist_ok=True)
        for index in range(images_per_identity):
            image = render_identity(identity, rng)
            cv2.imwrite(
                str(folder / f"{index:03d}.jpg"),
                cv2.cvtColor(image, cv2.COLOR_RGB2BGR),
                [cv2.IMWRITE_JPEG_QUALITY, 95],
            )
    return root


def write_pairs_tsv(
    root: str | Path, out: str | Path, pairs_per_fold: int = 30, folds: int = 10, seed: int = 0
) -> Path:
    """A verification TSV over the identity folders in ``root``: per fold, ``pairs_per_fold`` same and as many
    different pairs (``left right label fold``), paths relative to the TSV's folder."""
    root, out = Path(root), Path(out)
    rng = np.random.default_rng(seed)
    people = {p.name: sorted(p.iterdir()) for p in sorted(root.iterdir()) if p.is_dir()}
    names = [name for name, files in people.items() if len(files) >= 2]
    lines = []
    for fold in range(folds):
        for _ in range(pairs_per_fold):
            name = names[rng.integers(len(names))]
            a, b = rng.choice(len(people[name]), 2, replace=False)
            lines.append((people[name][a], people[name][b], 1, fold))
        for _ in range(pairs_per_fold):
            first, second = rng.choice(len(names), 2, replace=False)
            lines.append(
                (
                    people[names[first]][rng.integers(len(people[names[first]]))],
                    people[names[second]][rng.integers(len(people[names[second]]))],
                    0,
                    fold,
                )
            )
    with open(out, "w") as handle:
        handle.write("left\tright\tlabel\tfold\n")
        for left, right, label, fold in lines:
            handle.write(f"{left.relative_to(out.parent)}\t{right.relative_to(out.parent)}\t{label}\t{fold}\n")
    return out
