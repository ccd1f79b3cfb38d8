"""facedistill's alignment against insightface's ``face_align.norm_crop`` on ``../shared/data/raw_samples``.

For each of the 50 raw photos, YuNet's 5 landmarks are warped by facedistill with the default least-squares fit
and with the LMEDS fit (the one that made ``../shared/data``), and by insightface's ``norm_crop`` from the same
landmarks. Prints the largest pixel difference between facedistill's default and norm_crop, and the photos on which
the two fits differ by more than 1 grey level (mean and max absolute difference).

    python benchmarks/align_vs_norm_crop.py
"""

from __future__ import annotations

import warnings
from pathlib import Path

import cv2
import numpy as np

from facedistill.data.align import FaceAligner

RAW = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "raw_samples"


def main() -> None:
    from insightface.utils import face_align

    if not RAW.is_dir():
        raise SystemExit(f"raw samples not found at {RAW} (../shared beside the repository)")
    least_squares, lmeds = FaceAligner(fit="lstsq"), FaceAligner(fit="lmeds")
    paths = sorted(RAW.rglob("*.jpg"))
    worst, differing = 0, []
    for path in paths:
        image = cv2.imread(str(path))
        ours, robust = least_squares.align(image), lmeds.align(image)
        if ours.aligned is None or robust.aligned is None:
            print(f"{path}: no face")
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # scikit-image 0.26 deprecates what norm_crop calls
            theirs = face_align.norm_crop(image, landmark=ours.landmarks, image_size=112)
        worst = max(worst, int(np.abs(ours.aligned.astype(int) - theirs).max()))
        fits = np.abs(ours.aligned.astype(int) - robust.aligned.astype(int))
        if fits.max() > 1:
            differing.append((str(path.relative_to(RAW)), float(fits.mean()), int(fits.max())))
    print(f"{len(paths)} photos; max |facedistill default - insightface norm_crop| = {worst} grey levels")
    print(f"default (least squares) vs lmeds differ by more than 1 grey level on {len(differing)}:")
    for name, mean, peak in sorted(differing, key=lambda row: -row[1]):
        print(f"  {name}: mean {mean:.1f}, max {peak}")


if __name__ == "__main__":
    main()
