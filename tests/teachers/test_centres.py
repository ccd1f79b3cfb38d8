"""Per-rank teacher centres: re-sharding a PartialFC head over another world size, and mean/typicality per rank."""

from __future__ import annotations

import datetime
from pathlib import Path

import numpy as np
import pytest
import torch

from facedistill.data.datasets import ImageFolderDataset
from facedistill.heads.sharded import shard_range
from facedistill.teachers.cache import TeacherCache, build_teacher_cache
from facedistill.teachers.centres import (
    load_centre_shard,
    mean_centre_shard,
    teacher_shard_files,
    typicality_max_shard,
)
from facedistill.teachers.torch_teacher import load_head_centres
from tests.helpers import ProjectionTeacher, make_face_folders


def write_head(directory: Path, head: torch.Tensor, teacher_ranks: int, scheme: str = "checkpoint") -> list[Path]:
    """Save ``head`` as arcface_torch does from ``teacher_ranks`` ranks: PartialFC_V2 blocks, one file per rank."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for rank in range(teacher_ranks):
        start, end = shard_range(head.shape[0], rank, teacher_ranks)
        shard = head[start:end].clone()
        if scheme == "checkpoint":  # train_v2.py resume file: centres next to the backbone and optimiser
            path = directory / f"checkpoint_gpu_{rank}.pt"
            content = {
                "epoch": 3,
                "global_step": 1000,
                "state_dict_backbone": {"features.weight": torch.randn(256, 1024), "fc.weight": torch.randn(8, 8)},
                "state_dict_softmax_fc": {"weight": shard},
                "state_optimizer": {"state": {}, "param_groups": []},
            }
        else:  # 2022 train.py
            path = directory / f"softmax_fc_gpu_{rank}.pt"
            content = {"weight": shard}
        torch.save(content, path)
        paths.append(path)
    return paths


@pytest.mark.parametrize("scheme", ["checkpoint", "softmax_fc"])
@pytest.mark.parametrize("num_classes", [12, 11, 13])
@pytest.mark.parametrize("student_ranks", [1, 2, 4])
def test_head_of_3_teacher_ranks_reshards_into_student_ranks(tmp_path, scheme, num_classes, student_ranks) -> None:
    head = torch.randn(num_classes, 6, generator=torch.Generator().manual_seed(num_classes))
    write_head(tmp_path, head, 3, scheme)
    parts = [load_centre_shard(tmp_path, num_classes, 6, rank, student_ranks) for rank in range(student_ranks)]
    for rank, part in enumerate(parts):
        start, end = shard_range(num_classes, rank, student_ranks)
        assert part.dtype == torch.float32 and part.shape == (end - start, 6)
        assert torch.equal(part, head[start:end])
    assert torch.equal(torch.cat(parts), head)
    assert torch.equal(torch.cat(parts), load_head_centres(tmp_path))  # the single-process reference


def test_source_may_be_a_directory_a_file_list_or_one_shard(tmp_path) -> None:
    head = torch.randn(10, 4)
    paths = write_head(tmp_path / "run", head, 3)
    expected = head[shard_range(10, 1, 2)[0] : shard_range(10, 1, 2)[1]]
    for source in (tmp_path / "run", [str(p) for p in reversed(paths)], paths[2]):
        assert torch.equal(load_centre_shard(source, 10, 4, 1, 2), expected)
    whole = tmp_path / "head.pt"
    torch.save({"weight": head}, whole)  # one process wrote the whole head
    assert teacher_shard_files(whole) == [whole]
    assert torch.equal(load_centre_shard(whole, 10, 4, 1, 2), expected)


def test_shard_files_sort_ranks_numerically(tmp_path) -> None:
    for rank in range(11):
        (tmp_path / f"softmax_fc_gpu_{rank}.pt").touch()
    (tmp_path / "backbone.pth").touch()
    (tmp_path / "rank_0_softmax_weight_mom.pt").touch()  # momentum, never centres
    assert [p.name for p in teacher_shard_files(tmp_path)] == [f"softmax_fc_gpu_{r}.pt" for r in range(11)]


def test_shard_files_refuse_gaps_doubles_mixed_schemes_and_other_names(tmp_path) -> None:
    gap = tmp_path / "gap"
    gap.mkdir()
    for rank in (0, 1, 3):
        (gap / f"checkpoint_gpu_{rank}.pt").touch()
    with pytest.raises(ValueError, match=r"lack rank\(s\) \[2\] \(found checkpoint_gpu_0.pt, .*checkpoint_gpu_3.pt\)"):
        teacher_shard_files(gap)
    with pytest.raises(ValueError, match="teacher rank 0 is given twice"):
        teacher_shard_files([gap / "checkpoint_gpu_0.pt", tmp_path / "checkpoint_gpu_0.pt"])
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "checkpoint_gpu_0.pt").touch()
    (mixed / "softmax_fc_gpu_0.pt").touch()
    with pytest.raises(ValueError, match="several naming schemes .*checkpoint_gpu_0.pt, softmax_fc_gpu_0.pt"):
        teacher_shard_files(mixed)
    with pytest.raises(ValueError, match="mix naming schemes"):
        teacher_shard_files([mixed / "checkpoint_gpu_0.pt", mixed / "softmax_fc_gpu_1.pt"])
    with pytest.raises(ValueError, match="backbone.pth is not named like a teacher head shard"):
        teacher_shard_files([mixed / "checkpoint_gpu_0.pt", mixed / "backbone.pth"])
    with pytest.raises(FileNotFoundError, match=r"teacher head shard\(s\) not found: .*checkpoint_gpu_1.pt"):
        teacher_shard_files([mixed / "checkpoint_gpu_0.pt", mixed / "checkpoint_gpu_1.pt"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no teacher head shards .* in .*empty"):
        teacher_shard_files(tmp_path / "empty")


def test_opens_only_the_overlapping_teacher_shards_memory_mapped(tmp_path, monkeypatch) -> None:
    head = torch.randn(12, 4)
    write_head(tmp_path, head, 3)  # teacher blocks [0, 4) [4, 8) [8, 12)
    opened: list[tuple[str, bool]] = []
    real_load = torch.load

    def recording_load(path, *args, **kwargs):
        opened.append((Path(path).name, kwargs.get("mmap", False)))
        return real_load(path, *args, **kwargs)

    monkeypatch.setattr(torch, "load", recording_load)
    # student blocks of 4 ranks: [0, 3) [3, 6) [6, 9) [9, 12)
    expected = {0: ["checkpoint_gpu_0.pt"], 1: ["checkpoint_gpu_0.pt", "checkpoint_gpu_1.pt"]}
    expected |= {2: ["checkpoint_gpu_1.pt", "checkpoint_gpu_2.pt"], 3: ["checkpoint_gpu_2.pt"]}
    for rank, names in expected.items():
        opened.clear()
        start, end = shard_range(12, rank, 4)
        assert torch.equal(load_centre_shard(tmp_path, 12, 4, rank, 4), head[start:end])
        assert opened == [(name, True) for name in names]
    opened.clear()
    assert load_centre_shard(tmp_path, 12, 4, 13, 16).shape == (0, 4)  # more student ranks than classes
    assert opened == []


def test_pre_zip_format_files_are_read_whole(tmp_path) -> None:
    head = torch.randn(5, 3)
    for rank in range(2):
        start, end = shard_range(5, rank, 2)
        torch.save(
            {"weight": head[start:end]}, tmp_path / f"softmax_fc_gpu_{rank}.pt", _use_new_zipfile_serialization=False
        )
    assert torch.equal(torch.cat([load_centre_shard(tmp_path, 5, 3, r, 3) for r in range(3)]), head)


def test_refuses_files_that_pickle_python_objects(tmp_path) -> None:
    torch.save({"weight": torch.randn(4, 3), "when": datetime.date(2022, 1, 1)}, tmp_path / "softmax_fc_gpu_0.pt")
    with pytest.raises(ValueError, match=r"softmax_fc_gpu_0.pt cannot be read with torch.load\(weights_only=True\)"):
        load_centre_shard(tmp_path, 4, 3, 0, 1)


def test_refuses_another_class_count_with_both_numbers(tmp_path) -> None:
    write_head(tmp_path, torch.randn(100001, 2), 3)  # 33334, 33334, 33333 rows
    # Student rank 0 of 2 ([0, 50000)) needs teacher ranks 0 and 1; rank 0's 33334 rows fit 100000 too.
    with pytest.raises(
        ValueError,
        match=r"checkpoint_gpu_1.pt holds 33334 centres but a PartialFC split of config.num_classes = 100000 "
        r"over 3 teacher ranks gives it 33333: the teacher was trained on another number of classes",
    ):
        load_centre_shard(tmp_path, 100000, 2, 0, 2)
    with pytest.raises(ValueError, match=r"checkpoint_gpu_2.pt holds 33333 centres .* = 100002 .* gives it 33334"):
        load_centre_shard(tmp_path, 100002, 2, 0, 1)


def test_refuses_more_teacher_files_than_classes_without_opening_any(tmp_path, monkeypatch) -> None:
    write_head(tmp_path, torch.randn(3, 2), 3, "softmax_fc")
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("no shard should be opened"))
    with pytest.raises(ValueError, match=r"3 shard files .* but config.num_classes = 2: a PartialFC split"):
        load_centre_shard(tmp_path, 2, 2, 0, 1)


def test_refuses_another_embedding_size_with_both_numbers(tmp_path) -> None:
    write_head(tmp_path, torch.randn(7, 8), 3)
    with pytest.raises(ValueError, match=r"checkpoint_gpu_0.pt holds 8-d centres but config.embedding_size = 4"):
        load_centre_shard(tmp_path, 7, 4, 0, 2)


def test_refuses_non_finite_centres(tmp_path) -> None:
    head = torch.randn(6, 2)
    head[4, 1] = float("nan")
    write_head(tmp_path, head, 2, "softmax_fc")
    assert torch.equal(load_centre_shard(tmp_path, 6, 2, 0, 2), head[:3])
    with pytest.raises(ValueError, match=r"softmax_fc_gpu_1.pt holds non-finite centres \(classes \[4\]\)"):
        load_centre_shard(tmp_path, 6, 2, 1, 2)


# --- per-rank mean centres and typicality from a teacher cache -------------------------------------------------------


class RecordingRows:
    """Stands in for the cache's memmap and records every index it is read with."""

    def __init__(self, data: np.ndarray) -> None:
        self.data = data
        self.reads: list[np.ndarray] = []

    def __getitem__(self, key):
        assert isinstance(key, np.ndarray), f"rows must be read by index, not {key!r}"
        self.reads.append(key.copy())
        return self.data[key]


@pytest.fixture(scope="module")
def cached(tmp_path_factory) -> tuple[Path, np.ndarray]:
    root = tmp_path_factory.mktemp("faces")
    train, _ = make_face_folders(root, identities=7, images=3, test_identities=2)
    dataset = ImageFolderDataset(train)
    build_teacher_cache(ProjectionTeacher(), dataset, root / "cache", batch_size=8, num_workers=0, progress=False)
    return root / "cache", dataset.labels


def recording_cache(directory: Path) -> tuple[TeacherCache, RecordingRows]:
    cache = TeacherCache(directory)
    rows = RecordingRows(cache.embeddings)
    cache.embeddings = rows
    return cache, rows


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_mean_centre_shard_matches_mean_centres_reading_only_its_rows(cached, world_size) -> None:
    directory, labels = cached
    full = TeacherCache(directory).mean_centres(labels, 7)
    parts = []
    for rank in range(world_size):
        cache, rows = recording_cache(directory)
        part = mean_centre_shard(cache, labels, 7, rank, world_size, chunk=4)
        start, end = shard_range(7, rank, world_size)
        assert torch.allclose(part, full[start:end], atol=1e-6)
        read = np.concatenate(rows.reads)
        assert read.tolist() == np.flatnonzero((labels >= start) & (labels < end)).tolist()
        assert all(len(r) <= 4 for r in rows.reads)
        parts.append(part)
    assert torch.allclose(torch.cat(parts), full, atol=1e-6)


def test_mean_centre_shard_names_classes_without_images(cached) -> None:
    directory, labels = cached
    holes = np.where(labels == 5, 4, labels)  # class 5 loses its images to class 4
    cache = TeacherCache(directory)
    assert mean_centre_shard(cache, holes, 7, 0, 2).shape == (4, 16)  # classes [0, 4) all have images
    with pytest.raises(ValueError, match=r"1 class\(es\) of rank 1's block \[4, 7\) have no image .*: 5;"):
        mean_centre_shard(cache, holes, 7, 1, 2)
    with pytest.raises(ValueError, match=r"labels range over \[0, 6\] but num_classes = 6"):
        mean_centre_shard(cache, labels, 6, 0, 2)
    with pytest.raises(ValueError, match="holds 21 images: pass the training set's integer labels"):
        mean_centre_shard(cache, labels[:-1], 7, 0, 2)


@pytest.mark.parametrize("world_size", [1, 2, 3, 7])
def test_typicality_max_shard_matches_typicality_reading_only_its_rows(cached, world_size) -> None:
    directory, labels = cached
    head = torch.randn(7, 16, generator=torch.Generator().manual_seed(3)) * 5  # unnormalised, as a head is
    typicality = TeacherCache(directory).typicality(head, labels)
    peaks = []
    for rank in range(world_size):
        cache, rows = recording_cache(directory)
        start, end = shard_range(7, rank, world_size)
        peak = typicality_max_shard(cache, labels, head[start:end], start, chunk=2)
        in_block = (labels >= start) & (labels < end)
        assert peak == pytest.approx(float(typicality[torch.from_numpy(in_block)].max()), abs=1e-6)
        assert np.concatenate(rows.reads).tolist() == np.flatnonzero(in_block).tolist()
        peaks.append(peak)
    assert max(peaks) == pytest.approx(float(typicality.max()), abs=1e-6)


def test_typicality_max_shard_without_images_and_with_wrong_width(cached) -> None:
    directory, labels = cached
    cache = TeacherCache(directory)
    assert typicality_max_shard(cache, labels, torch.randn(2, 16), 7) == float("-inf")  # classes 7, 8: no image
    with pytest.raises(ValueError, match=r"local centres have shape \[3, 8\] but .* holds 16-d embeddings"):
        typicality_max_shard(cache, labels, torch.randn(3, 8), 0)
