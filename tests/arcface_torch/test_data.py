"""The framework's data through facedistill: ``.bin`` val targets as upstream's ``load_bin`` returns them."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from facedistill.arcface_torch.data import load_bin
from facedistill.data.verification import PairsFormatError, write_bin


def _pack(path: Path, issame: np.ndarray) -> Path:
    face = np.zeros((112, 112, 3), dtype=np.uint8)
    face[:, :56] = (10, 120, 230)  # BGR as written; read back RGB
    encoded = cv2.imencode(".png", face)[1].tobytes()
    write_bin(path, [encoded] * (2 * len(issame)), issame.tolist())
    return path


def test_load_bin_returns_upstreams_layout(tmp_path: Path) -> None:
    issame = np.tile([True, False], 10)
    (images, mirrored), flags = load_bin(_pack(tmp_path / "v.bin", issame))
    assert images.shape == (40, 3, 112, 112) and flags == issame.tolist()
    assert images[0, :, 0, 0].tolist() == [230.0, 120.0, 10.0]
    assert (mirrored == images.flip(-1)).all()


def test_a_val_target_whose_folds_lack_impostors_is_refused_before_decoding(tmp_path: Path) -> None:
    # Genuine pairs first, impostors after: upstream's verification would die in ZeroDivisionError at the first
    # validation step, minutes into training.
    issame = np.array([True] * 20 + [False] * 20)
    with pytest.raises(PairsFormatError, match=r"v.bin: pairs 0-3 \(fold 1 of 10\) hold no impostor pair"):
        load_bin(_pack(tmp_path / "v.bin", issame))
