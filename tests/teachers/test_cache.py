import json
import multiprocessing

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from facedistill.data.datasets import ImageFolderDataset
from facedistill.data.rowstore import write_json_atomic
from facedistill.teachers.cache import (
    CACHE_FORMAT,
    HEAD_CENTRES,
    StaleCacheError,
    TeacherCache,
    build_teacher_cache,
    class_centres,
)
from tests.helpers import ProjectionTeacher, make_face_folders


@pytest.fixture()
def dataset(tmp_path):
    train, _ = make_face_folders(tmp_path, identities=4, images=5)
    return ImageFolderDataset(train)


def test_cache_holds_image_and_mirror_embeddings(tmp_path, dataset) -> None:
    teacher = ProjectionTeacher()
    cache = build_teacher_cache(teacher, dataset, tmp_path / "cache", batch_size=6, num_workers=0, progress=False)
    image, _, _ = dataset[7]
    expected = teacher.embed(image[None])[0]
    expected_mirror = teacher.embed(image.flip(-1)[None])[0]
    rows = cache.rows(torch.tensor([7, 7]), torch.tensor([False, True]))
    assert torch.allclose(rows[0], expected, atol=2e-2, rtol=1e-2)
    assert torch.allclose(rows[1], expected_mirror, atol=2e-2, rtol=1e-2)
    assert not torch.allclose(rows[0], rows[1], atol=1e-2)
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    assert manifest["teacher_id"] == teacher.teacher_id and manifest["format"] == CACHE_FORMAT
    assert cache.complete and manifest["store"]["shape"] == [len(dataset), 2, 16]


def build(teacher, dataset, directory, **kwargs) -> TeacherCache:
    kwargs = {"batch_size": 4, "num_workers": 0, "chunk_images": 4, "progress": False, **kwargs}
    return build_teacher_cache(teacher, dataset, directory, **kwargs)


def test_interrupted_cache_resumes_to_byte_identical_rows(tmp_path, dataset) -> None:
    full = build(ProjectionTeacher(), dataset, tmp_path / "full")
    with pytest.raises(KeyboardInterrupt):
        build(ProjectionTeacher(fail_after_batches=3), dataset, tmp_path / "part")
    part = TeacherCache(tmp_path / "part")
    assert not part.complete and part.store.chunks_done == 3  # 3 batches of 4 rows: 3 chunks of 4 rows done
    with pytest.raises(StaleCacheError, match=r"part is incomplete: 3/5 chunks \(12/20 rows\) done; run"):
        part.check(dataset)
    resumed_teacher = ProjectionTeacher()
    resumed = build(resumed_teacher, dataset, tmp_path / "part")
    assert resumed_teacher.calls == 2  # only the 8 missing rows, in 2 batches
    assert np.asarray(resumed.embeddings).tobytes() == np.asarray(full.embeddings).tobytes()


class BarrierTeacher(ProjectionTeacher):
    """Waits at its first batch until every rank got there, so the ranks of a test embed at the same time."""

    def __init__(self, barrier) -> None:
        super().__init__()
        self.barrier = barrier

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        if self.calls == 0:
            self.barrier.wait(timeout=120)
        return super().embed(images)


def _build_rank(root: str, directory: str, rank: int, world_size: int, barrier) -> None:
    torch.set_num_threads(1)
    build(BarrierTeacher(barrier), ImageFolderDataset(root), directory, rank=rank, world_size=world_size)


def test_ranks_write_one_cache_equal_to_a_single_process_build(tmp_path, dataset) -> None:
    full = np.asarray(build(ProjectionTeacher(), dataset, tmp_path / "full").embeddings).tobytes()
    # In turn: rank 0 of 2 returns the unchecked, unfinished cache; rank 1 completes and checks it.
    first = build(ProjectionTeacher(), dataset, tmp_path / "sequential", rank=0, world_size=2)
    assert not first.complete and first.store.done().tolist() == [True, False, True, False, True]
    with pytest.raises(StaleCacheError, match="sequential is incomplete: 3/5 chunks"):
        first.check(dataset)
    second_teacher = ProjectionTeacher()
    second = build(second_teacher, dataset, tmp_path / "sequential", rank=1, world_size=2)
    assert second.complete and second_teacher.calls == 2 and first.complete
    assert np.asarray(second.embeddings).tobytes() == full
    # At the same time, in two processes that both embed before either finishes.
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(2)
    processes = [
        context.Process(target=_build_rank, args=(str(dataset.root), str(tmp_path / "concurrent"), rank, 2, barrier))
        for rank in range(2)
    ]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=300)
    assert [process.exitcode for process in processes] == [0, 0]
    concurrent = TeacherCache(tmp_path / "concurrent")
    concurrent.check(dataset, ProjectionTeacher().teacher_id)
    assert np.asarray(concurrent.embeddings).tobytes() == full


def test_one_process_finishes_a_cache_begun_by_rank_0_of_3(tmp_path, dataset) -> None:
    full = np.asarray(build(ProjectionTeacher(), dataset, tmp_path / "full").embeddings).tobytes()
    build(ProjectionTeacher(), dataset, tmp_path / "cache", rank=0, world_size=3)  # chunks 0 and 3 of 5
    teacher = ProjectionTeacher()
    cache = build(teacher, dataset, tmp_path / "cache")
    assert teacher.calls == 3 and cache.complete  # chunks 1, 2 and 4
    assert np.asarray(cache.embeddings).tobytes() == full


class HeadTeacher(ProjectionTeacher):
    def class_centres(self) -> torch.Tensor | None:
        return torch.eye(4, 16)


def test_head_centres_are_written_by_rank_0_only(tmp_path, dataset) -> None:
    build(HeadTeacher(), dataset, tmp_path / "cache", rank=1, world_size=2)
    assert not (tmp_path / "cache" / HEAD_CENTRES).exists()
    cache = build(HeadTeacher(), dataset, tmp_path / "cache", rank=0, world_size=2)
    assert torch.equal(cache.head_centres(), torch.eye(4, 16))
    assert list((tmp_path / "cache").glob("*.tmp*")) == []


def test_stale_cache_is_refused(tmp_path, dataset) -> None:
    build_teacher_cache(ProjectionTeacher(), dataset, tmp_path / "cache", num_workers=0, progress=False)
    cache = TeacherCache(tmp_path / "cache")
    with pytest.raises(StaleCacheError, match="cache holds embeddings of teacher 'projection-16-0', not 'other'"):
        cache.check(dataset, "other")
    with pytest.raises(
        StaleCacheError, match=r"cache/manifest.json holds a teacher cache of another .*pass --overwrite"
    ):
        build_teacher_cache(ProjectionTeacher(seed=1), dataset, tmp_path / "cache", num_workers=0, progress=False)
    cache.check_source(dataset.fingerprint(), len(dataset), "projection-16-0")
    with pytest.raises(StaleCacheError, match=r"cache was built for another dataset \(folder:.*, 20 images\)"):
        cache.check_source("folder:other", len(dataset), None)
    extra = dataset.root / "id_00000" / "999.jpg"
    extra.write_bytes((dataset.root / dataset.relative_paths[0]).read_bytes())
    with pytest.raises(StaleCacheError, match="another dataset"):
        cache.check(ImageFolderDataset(dataset.root))
    replaced = build(ProjectionTeacher(seed=1), dataset, tmp_path / "cache", overwrite=True)
    assert replaced.teacher_id == "projection-16-1"


def test_an_old_format_cache_is_refused_saying_to_rebuild(tmp_path, dataset) -> None:
    old = tmp_path / "old"
    old.mkdir()
    manifest = {"format": 1, "teacher_id": "projection-16-0", "num_images": 20, "embedding_size": 16, "completed": 20}
    write_json_atomic(old / "manifest.json", manifest)
    (old / "embeddings.f16").write_bytes(bytes(20 * 2 * 16 * 2))
    with pytest.raises(
        StaleCacheError, match=r"old/manifest.json: .* format 1 .*`facedistill cache-teacher --overwrite`"
    ):
        TeacherCache(old)
    with pytest.raises(StaleCacheError, match=r"old/manifest.json: .* format 1 .*--overwrite"):
        build(ProjectionTeacher(), dataset, old)
    assert build(ProjectionTeacher(), dataset, old, overwrite=True).complete


def test_centres_are_normalised_class_means_of_images_and_mirrors(tmp_path, dataset) -> None:
    cache = build_teacher_cache(ProjectionTeacher(), dataset, tmp_path / "cache", num_workers=0, progress=False)
    centres, source = class_centres(cache, dataset.labels, dataset.num_classes)
    assert source == "mean" and centres.shape == (4, 16)
    rows = F.normalize(torch.from_numpy(np.asarray(cache.embeddings, dtype=np.float32)), dim=2)
    members = torch.from_numpy(dataset.labels == 2)
    expected = F.normalize(rows[members].reshape(-1, 16).mean(0), dim=0)
    assert torch.allclose(centres[2], expected, atol=1e-5)
    typicality = cache.typicality(centres, dataset.labels)
    assert typicality.shape == (len(dataset), 2)
    assert torch.allclose(typicality[members][:, 0], rows[members][:, 0] @ expected, atol=1e-5)
    with pytest.raises(ValueError, match="holds no head centres"):
        class_centres(cache, dataset.labels, dataset.num_classes, source="head")


def test_subtract_mean_centres_the_embeddings_before_the_class_means(tmp_path, dataset) -> None:
    cache = build_teacher_cache(ProjectionTeacher(), dataset, tmp_path / "cache", num_workers=0, progress=False)
    rows = F.normalize(torch.from_numpy(np.asarray(cache.embeddings, dtype=np.float32)), dim=2)
    mean = cache.mean_embedding()
    assert torch.allclose(mean, rows.reshape(-1, 16).mean(0), atol=1e-6)
    centres, source = class_centres(cache, dataset.labels, dataset.num_classes, offset=mean)
    assert source == "mean-centred"
    members = torch.from_numpy(dataset.labels == 1)
    centred = rows[members].reshape(-1, 16) - mean
    expected = F.normalize(centred.mean(0), dim=0)
    assert torch.allclose(centres[1], expected, atol=1e-5)
    typicality = cache.typicality(centres, dataset.labels, offset=mean)
    assert torch.allclose(
        typicality[members][:, 1], F.normalize(rows[members][:, 1] - mean, dim=1) @ expected, atol=1e-5
    )
    # The shared direction is gone: the centred centres average to (nearly) nothing, the raw ones do not.
    raw, _ = class_centres(cache, dataset.labels, dataset.num_classes)
    assert centres.mean(0).norm() < raw.mean(0).norm()


def test_subtract_mean_refuses_a_teacher_head(tmp_path, dataset) -> None:
    cache = build_teacher_cache(ProjectionTeacher(), dataset, tmp_path / "cache", num_workers=0, progress=False)
    np.save(cache.directory / HEAD_CENTRES, np.eye(4, 16, dtype=np.float32))
    with pytest.raises(ValueError, match=r"holds the teacher's head .*teacher.centres=mean"):
        class_centres(cache, dataset.labels, dataset.num_classes, offset=cache.mean_embedding())
    centres, source = class_centres(cache, dataset.labels, dataset.num_classes, "mean", cache.mean_embedding())
    assert source == "mean-centred" and centres.shape == (4, 16)


class _OverflowingTeacher(ProjectionTeacher):
    """Embeddings beyond float16's range (an untrained network's BatchNorm can give them), or NaN."""

    def __init__(self, value: float) -> None:
        super().__init__()
        self.value = value

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        return super().embed(images) * 0 + self.value


@pytest.mark.parametrize("value, words", [(1e6, "beyond float16's range"), (float("nan"), "not finite")])
def test_rows_the_cache_cannot_hold_are_refused_naming_the_first_record(tmp_path, dataset, value, words) -> None:
    with pytest.raises(ValueError, match=rf"{words}.* the first #0: check the teacher's weights"):
        build_teacher_cache(_OverflowingTeacher(value), dataset, tmp_path / "cache", num_workers=0, progress=False)
