import ast
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from facedistill.config import load_config
from facedistill.data import decoded_cache as decoded_module
from facedistill.data import rowstore
from facedistill.data.datasets import ImageFolderDataset, RecordDataset, collate_faces, open_training_set
from facedistill.data.decoded_cache import DecodedImageDataset, build_decoded_cache, open_decoded_cache
from facedistill.data.images import ImageDecodeError, decode_image, to_chw_tensor
from facedistill.data.recordio import pack_folder_to_recordio
from facedistill.data.rowstore import write_json_atomic
from facedistill.teachers.cache import StaleCacheError, TeacherCache, build_teacher_cache
from tests.helpers import ProjectionTeacher, make_face_folders


@pytest.fixture()
def dataset(tmp_path) -> ImageFolderDataset:
    train, _ = make_face_folders(tmp_path, identities=4, images=5)
    return ImageFolderDataset(train)


class CountingDataset(ImageFolderDataset):
    """Counts decodes; raises KeyboardInterrupt (a user's Ctrl-C) once ``fail_after`` images were read."""

    def __init__(self, root, fail_after: int | None = None, skip_bad: bool = False) -> None:
        super().__init__(root, skip_bad)
        self.fail_after = fail_after
        self.reads = 0

    def __getitem__(self, index: int):
        if self.fail_after is not None and self.reads >= self.fail_after:
            raise KeyboardInterrupt("simulated interruption")
        self.reads += 1
        return super().__getitem__(index)


def build(source, directory, **kwargs) -> DecodedImageDataset:
    return build_decoded_cache(source, directory, batch_size=4, num_workers=0, progress=False, **kwargs)


def test_every_row_is_the_decoded_image_with_its_label_and_index(tmp_path, dataset) -> None:
    cache = build(dataset, tmp_path / "decoded")
    assert len(cache) == len(dataset) == 20 and cache.num_classes == dataset.num_classes == 4
    assert np.array_equal(cache.labels, dataset.labels)
    assert cache.fingerprint() == dataset.fingerprint()
    for index in range(len(dataset)):
        expected = decode_image(*dataset.read_bytes(index))
        assert np.array_equal(cache.images[index], expected)
        image, label, item = cache[index]
        assert torch.equal(image, to_chw_tensor(expected)) and image.is_contiguous()
        assert (label, item) == (int(dataset.labels[index]), index)
    manifest = json.loads((tmp_path / "decoded" / "manifest.json").read_text())
    assert manifest["num_images"] == 20 and manifest["shape"] == manifest["store"]["shape"] == [20, 112, 112, 3]
    assert (
        manifest["dataset_fingerprint"] == dataset.fingerprint() and manifest["format"] == decoded_module.CACHE_FORMAT
    )
    assert cache.store.complete and cache.unreadable == frozenset()


@pytest.mark.parametrize("workers", [0, 1])
def test_training_loader_batches_equal_the_source_batches(tmp_path, dataset, workers) -> None:
    cache = build(dataset, tmp_path / "decoded")
    order = [13, 2, 19, 7, 0, 11, 5, 16]
    batches = []
    for source in (dataset, cache):
        loader = DataLoader(source, batch_size=4, sampler=order, collate_fn=collate_faces, num_workers=workers)
        batches.append(list(loader))
    for expected, got in zip(*batches, strict=True):
        assert torch.equal(got.images, expected.images)
        assert torch.equal(got.labels, expected.labels) and torch.equal(got.indices, expected.indices)


def test_a_teacher_cache_of_the_source_serves_the_decoded_cache(tmp_path, dataset) -> None:
    cache = build(dataset, tmp_path / "decoded")
    build_teacher_cache(ProjectionTeacher(), dataset, tmp_path / "teacher", num_workers=0, progress=False)
    TeacherCache(tmp_path / "teacher").check(cache)  # same fingerprint and N: the rows line up


def test_interrupted_build_is_refused_then_resumes_to_the_same_rows(tmp_path, dataset) -> None:
    full = build(dataset, tmp_path / "full")
    with pytest.raises(KeyboardInterrupt):
        build(CountingDataset(dataset.root, fail_after=10), tmp_path / "part", chunk_images=4)
    message = r"decoded image cache .*part is incomplete: 2/5 chunks \(8/20 rows\) done; run `facedistill cache-images`"
    with pytest.raises(StaleCacheError, match=message):
        DecodedImageDataset(tmp_path / "part")
    resumed_source = CountingDataset(dataset.root)
    resumed = build(resumed_source, tmp_path / "part")
    assert resumed_source.reads == 12  # only the rows of the 3 unfinished chunks were decoded
    assert (tmp_path / "part" / "images.u8").read_bytes() == (tmp_path / "full" / "images.u8").read_bytes()
    assert np.array_equal(np.asarray(resumed.images), np.asarray(full.images))


def test_ranks_split_the_build_and_unreadable_rows_are_kept_per_chunk(tmp_path, dataset) -> None:
    broken = dataset.root / dataset.relative_paths[6]
    broken.write_bytes(broken.read_bytes()[:200])
    tolerant = ImageFolderDataset(dataset.root, skip_bad=True)
    whole = build(tolerant, tmp_path / "whole", chunk_images=4)
    first = CountingDataset(dataset.root, skip_bad=True)
    assert build(first, tmp_path / "split", chunk_images=4, rank=1, world_size=2) is None  # rank 0 still to come
    assert first.reads == 8  # chunks 1 and 3
    split = build(tolerant, tmp_path / "split", chunk_images=4, rank=0, world_size=2)
    assert split is not None and split.unreadable == whole.unreadable == frozenset({6})
    assert (tmp_path / "split" / "images.u8").read_bytes() == (tmp_path / "whole" / "images.u8").read_bytes()
    assert split[6] is None


def test_stale_cache_is_refused_naming_the_file(tmp_path, dataset) -> None:
    build(dataset, tmp_path / "decoded")
    extra = dataset.root / "id_00000" / "999.jpg"
    extra.write_bytes((dataset.root / dataset.relative_paths[0]).read_bytes())
    changed = ImageFolderDataset(dataset.root)
    with pytest.raises(StaleCacheError, match=r"decoded/manifest.json was built from another dataset"):
        open_decoded_cache(changed, tmp_path / "decoded")
    with pytest.raises(StaleCacheError, match=r"decoded/manifest.json holds a decoded image cache of another source"):
        build(changed, tmp_path / "decoded")
    rebuilt = build(changed, tmp_path / "decoded", overwrite=True)
    assert len(rebuilt) == 21 and rebuilt.fingerprint() == changed.fingerprint()


def test_open_training_set_builds_once_then_reuses(tmp_path, dataset, monkeypatch) -> None:
    opened = open_training_set(dataset.root, decoded_cache=tmp_path / "decoded")
    assert isinstance(opened, DecodedImageDataset) and len(opened) == len(dataset)

    def no_rebuild(*args, **kwargs):
        raise AssertionError("a finished cache must not be rebuilt")

    monkeypatch.setattr(decoded_module, "build_decoded_cache", no_rebuild)
    again = open_training_set(dataset.root, decoded_cache=tmp_path / "decoded")
    assert torch.equal(again[3][0], dataset[3][0])
    config = load_config(overrides=[f"data.decoded_cache={tmp_path / 'decoded'}"])
    assert config.data.decoded_cache == str(tmp_path / "decoded")


def test_recordio_source(tmp_path, dataset) -> None:
    samples = [
        (dataset.root / rel, int(label)) for rel, label in zip(dataset.relative_paths, dataset.labels, strict=True)
    ]
    pack_folder_to_recordio(samples, tmp_path / "rec", progress=False)
    records = open_training_set(tmp_path / "rec")
    assert isinstance(records, RecordDataset)
    cache = open_training_set(tmp_path / "rec", decoded_cache=tmp_path / "decoded")
    assert isinstance(cache, DecodedImageDataset)
    assert cache.fingerprint() == records.fingerprint() and np.array_equal(cache.labels, records.labels)
    for index in range(len(records)):
        image, label, item = cache[index]
        assert torch.equal(image, records[index][0]) and (label, item) == (int(records.labels[index]), index)
    with pytest.raises(StaleCacheError, match="built from another dataset"):
        open_decoded_cache(dataset, tmp_path / "decoded")  # the folder has another fingerprint than its record


def test_unreadable_images_stop_the_build_or_are_skipped_as_by_the_source(tmp_path, dataset) -> None:
    broken = dataset.root / dataset.relative_paths[6]
    broken.write_bytes(broken.read_bytes()[:200])
    with pytest.raises(ImageDecodeError, match=dataset.relative_paths[6]):
        build(ImageFolderDataset(dataset.root), tmp_path / "strict")
    tolerant = ImageFolderDataset(dataset.root, skip_bad=True)
    cache = build(tolerant, tmp_path / "tolerant")
    assert cache[6] is None and cache[7] is not None
    batch = collate_faces(cache.__getitems__([5, 6, 7]))
    assert batch.skipped == 1 and batch.indices.tolist() == [5, 7]
    with pytest.raises(ImageDecodeError, match="image #6 was unreadable"):
        DecodedImageDataset(tmp_path / "tolerant", skip_bad=False)[6]


def test_too_little_disk_space_is_refused_before_writing(tmp_path, dataset, monkeypatch) -> None:
    class Usage:
        free = 1024

    monkeypatch.setattr(rowstore.shutil, "disk_usage", lambda path: Usage())
    with pytest.raises(OSError, match=r"decoded/images.u8 needs 0.00 GiB \(20 rows x 37632 bytes.*on the fly"):
        build(dataset, tmp_path / "decoded")
    assert not (tmp_path / "decoded" / "images.u8").exists()


def test_cache_images_command(tmp_path, dataset) -> None:
    from typer.testing import CliRunner

    from facedistill.cli import app

    runner = CliRunner()
    out = tmp_path / "decoded"
    result = runner.invoke(app, ["cache-images", str(dataset.root), str(out), "--workers", "0"])
    assert result.exit_code == 0, result.output
    assert "decoded 20 images of 4 identities" in result.output
    assert len(DecodedImageDataset(out)) == 20
    (dataset.root / dataset.relative_paths[0]).unlink()
    stale = runner.invoke(app, ["cache-images", str(dataset.root), str(out), "--workers", "0"])
    assert stale.exit_code == 2 and "pass --overwrite" in stale.output


def test_an_old_format_cache_is_refused_saying_to_rebuild(tmp_path, dataset) -> None:
    build(dataset, tmp_path / "decoded")
    manifest = json.loads((tmp_path / "decoded" / "manifest.json").read_text())
    old = {key: value for key, value in manifest.items() if key != "store"}
    write_json_atomic(tmp_path / "decoded" / "manifest.json", {**old, "format": 1, "completed": 20, "unreadable": []})
    rebuild = r"decoded/manifest.json: .* format 1 .*`facedistill cache-images --overwrite`"
    for attempt in (
        lambda: DecodedImageDataset(tmp_path / "decoded"),
        lambda: open_decoded_cache(dataset, tmp_path / "decoded"),
        lambda: build(dataset, tmp_path / "decoded"),
    ):
        with pytest.raises(StaleCacheError, match=rebuild):
            attempt()
    assert len(build(dataset, tmp_path / "decoded", overwrite=True)) == 20


def test_importing_the_decoded_cache_does_not_import_the_teachers() -> None:
    """data must not depend on teachers (teachers.cache imports data.datasets: the other way is a circle)."""
    code = (
        "import sys, facedistill.data.decoded_cache, facedistill.data.datasets, facedistill.data.rowstore\n"
        "print(sorted(name for name in sys.modules if name.startswith('facedistill.teachers')))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def _data_imports() -> dict[str, set[str]]:
    """``{module: facedistill.data modules it imports}`` for every module of facedistill.data, function-level
    (lazy) imports included, read from the source."""
    package = Path(decoded_module.__file__).parent
    graph: dict[str, set[str]] = {}
    for path in sorted(package.glob("*.py")):
        name = f"facedistill.data.{path.stem}"
        imported: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module:
                imported.add(node.module)
                imported.update(f"{node.module}.{alias.name}" for alias in node.names)
            elif isinstance(node, ast.Import):
                imported.update(alias.name for alias in node.names)
        graph[name] = {other for other in imported if other.startswith("facedistill.data.") and other != name}
    return {name: {other for other in imports if other in graph} for name, imports in graph.items()}


def test_data_modules_import_each_other_one_way() -> None:
    graph = _data_imports()
    assert graph["facedistill.data.decoded_cache"] >= {"facedistill.data.dataset_base"}
    assert "facedistill.data.datasets" not in graph["facedistill.data.decoded_cache"]
    done: set[str] = set()

    def visit(name: str, path: tuple[str, ...]) -> None:
        assert name not in path, "import circle: " + " -> ".join((*path[path.index(name) :], name))
        if name not in done:
            for other in sorted(graph[name]):
                visit(other, (*path, name))
            done.add(name)

    for name in graph:
        visit(name, ())
