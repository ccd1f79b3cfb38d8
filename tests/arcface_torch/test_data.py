"""The framework's data through facedistill: ``.bin`` val targets as upstream's ``load_bin`` returns them, and
training samples with upstream's flip and, with ``config.shift``, facedistill's shift."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from facedistill.arcface_torch.data import FrameworkFaces, TeacherRows, load_bin, normalise_like_upstream
from facedistill.data.images import random_shift
from facedistill.data.verification import PairsFormatError, write_bin
from tests.arcface_torch.helpers import import_patched_dataset


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


class _Faces:
    """Two distinct 112x112 uint8 faces, served as facedistill's datasets serve them: (image, label, path)."""

    def __init__(self) -> None:
        generator = torch.Generator().manual_seed(0)
        self.images = torch.randint(0, 256, (2, 3, 112, 112), dtype=torch.uint8, generator=generator)

    def __len__(self) -> int:
        return 2

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, str]:
        return self.images[index], index, f"face{index}.jpg"


class _Rows:
    """A teacher whose rows say which record and view they were read for: [[index, 0], [index, mirrored]]."""

    def row(self, index: int, mirrored: bool) -> torch.Tensor:
        return torch.tensor([[index, 0.0], [index, float(mirrored)]])


def _read(rows: torch.Tensor) -> tuple[int, bool]:
    return int(rows[1, 0]), bool(rows[1, 1])


def test_without_shift_a_sample_draws_only_upstreams_flip() -> None:
    faces = _Faces()
    torch.manual_seed(3)
    image, label, rows = FrameworkFaces(faces, teacher=_Rows())[1]  # type: ignore[arg-type]
    index, mirrored = _read(rows)
    after = torch.rand(1)
    torch.manual_seed(3)
    expected_mirror = bool(torch.rand(1) < 0.5)
    assert torch.equal(torch.rand(1), after)  # one draw, as RandomHorizontalFlip
    view = faces.images[1].flip(-1) if expected_mirror else faces.images[1]
    assert torch.equal(image, normalise_like_upstream(view))
    assert (label.item(), index, mirrored) == (1, 1, expected_mirror)


def test_shift_translates_the_flipped_image_and_keeps_its_mirror_flag() -> None:
    faces = _Faces()
    moved = []
    for seed in range(8):
        torch.manual_seed(seed)
        image, _, rows = FrameworkFaces(faces, teacher=_Rows(), shift=3)[0]  # type: ignore[arg-type]
        mirrored = _read(rows)[1]
        torch.manual_seed(seed)
        expected_mirror = bool(torch.rand(1) < 0.5)
        view = faces.images[0].flip(-1) if expected_mirror else faces.images[0]
        expected = random_shift(view[None], None, 3)[0]  # the same default-generator stream, after the flip
        assert mirrored == expected_mirror
        assert torch.equal(image, normalise_like_upstream(expected))
        moved.append(not torch.equal(image, normalise_like_upstream(view)))
    assert sum(moved) >= 6, moved  # a draw of (0, 0) leaves the image in place: 1 in 49


def test_a_negative_shift_is_refused() -> None:
    with pytest.raises(ValueError, match="config.shift must be >= 0 pixels, got -1"):
        FrameworkFaces(_Faces(), shift=-1)


def test_the_patched_get_dataloader_hands_config_shift_to_the_dataset(patched_checkout: Path) -> None:
    module = import_patched_dataset(patched_checkout, "patched_dataset")
    data = str(patched_checkout / "data" / "tiny")
    assert module.get_dataloader(data, 0, 4, num_workers=0).dataset.shift == 0
    teacher = TeacherRows(Path(data) / "teacher_cache", "facedistill arcface-torch cache-teacher CONFIG")
    loader = module.get_dataloader(data, 0, 4, num_workers=0, teacher=teacher, shift=2)
    assert loader.dataset.shift == 2 and loader.dataset.teacher is teacher
    images, labels, rows = next(iter(loader))
    assert images.shape == (4, 3, 112, 112) and images.dtype == torch.float32
    assert rows.shape == (4, 2, 128) and rows.dtype == torch.float32


def test_teacher_rows_are_the_originals_then_the_views_and_pickle_without_the_cache(patched_checkout: Path) -> None:
    import pickle

    from facedistill.teachers.cache import TeacherCache

    directory = patched_checkout / "data" / "tiny" / "teacher_cache"
    cache = TeacherCache(directory)
    teacher = TeacherRows(directory, "CMD")
    for mirrored in (False, True):
        rows = teacher.row(3, mirrored)
        expected = cache.rows(torch.tensor([3, 3]), torch.tensor([False, mirrored]))
        assert torch.equal(rows, expected) and rows.dtype == torch.float32
    assert not torch.equal(teacher.row(3, True)[1], teacher.row(3, False)[1])
    # A worker gets the directory, not the memory map (a spawned worker would otherwise unpickle a copy of it).
    copied = pickle.loads(pickle.dumps(teacher))
    assert copied._cache is None and copied.directory == directory
    assert torch.equal(copied.row(5, True), teacher.row(5, True))
