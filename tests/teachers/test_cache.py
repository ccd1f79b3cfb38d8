import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from facedistill.data.datasets import ImageFolderDataset
from facedistill.teachers.cache import StaleCacheError, TeacherCache, build_teacher_cache, class_centres
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
    assert manifest["completed"] == len(dataset) and manifest["teacher_id"] == teacher.teacher_id


def test_interrupted_cache_resumes_to_the_same_result(tmp_path, dataset) -> None:
    full = build_teacher_cache(
        ProjectionTeacher(), dataset, tmp_path / "full", batch_size=4, num_workers=0, progress=False
    )
    with pytest.raises(KeyboardInterrupt):
        build_teacher_cache(
            ProjectionTeacher(fail_after_batches=3),
            dataset,
            tmp_path / "part",
            batch_size=4,
            num_workers=0,
            chunk_images=4,
            progress=False,
        )
    partial = json.loads((tmp_path / "part" / "manifest.json").read_text())
    assert 0 < partial["completed"] < len(dataset)
    with pytest.raises(StaleCacheError, match="incomplete"):
        TeacherCache(tmp_path / "part").check(dataset)
    resumed_teacher = ProjectionTeacher()
    resumed = build_teacher_cache(
        resumed_teacher, dataset, tmp_path / "part", batch_size=4, num_workers=0, progress=False
    )
    assert resumed_teacher.calls == -(-(len(dataset) - partial["completed"]) // 4)  # only the missing rows
    assert np.array_equal(np.asarray(resumed.embeddings), np.asarray(full.embeddings))


def test_stale_cache_is_refused(tmp_path, dataset) -> None:
    build_teacher_cache(ProjectionTeacher(), dataset, tmp_path / "cache", num_workers=0, progress=False)
    cache = TeacherCache(tmp_path / "cache")
    with pytest.raises(StaleCacheError, match="holds embeddings of teacher 'projection-16-0', not 'other'"):
        cache.check(dataset, "other")
    with pytest.raises(StaleCacheError, match="pass --overwrite"):
        build_teacher_cache(ProjectionTeacher(seed=1), dataset, tmp_path / "cache", num_workers=0, progress=False)
    extra = dataset.root / "id_00000" / "999.jpg"
    extra.write_bytes((dataset.root / dataset.relative_paths[0]).read_bytes())
    with pytest.raises(StaleCacheError, match="another dataset"):
        cache.check(ImageFolderDataset(dataset.root))


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
