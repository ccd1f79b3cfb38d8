"""The validation split: held-out identities, their pairs, and training sets opened without them."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import facedistill.data.datasets as datasets_module
import facedistill.teachers
from facedistill.cli import app
from facedistill.config import load_config
from facedistill.data.datasets import ImageFolderDataset, open_training_set
from facedistill.data.recordio import open_face_record, pack_folder_to_recordio
from facedistill.data.splits import (
    IDENTITIES_FILE,
    PAIRS_FILE,
    make_identity_split,
    read_identity_list,
    write_split,
)
from facedistill.data.synthetic import write_identity_folders
from facedistill.data.verification import read_bin_pairs, read_pairs_tsv
from facedistill.eval.verify import load_pairs_set
from facedistill.teachers.cache import StaleCacheError, TeacherCache, build_teacher_cache
from tests.conftest import REPO_ROOT
from tests.helpers import ProjectionTeacher, make_face_folders

runner = CliRunner()
# 10 identities x 5 images; 3 held out, 10 folds x (2 same + 2 different): the fold layout a .bin reads back.
SIZES = {"num_val_identities": 3, "pairs_per_fold": 2, "num_folds": 10}
COMMITTED = REPO_ROOT / "recipes" / "splits" / "celeba299"


@pytest.fixture(scope="module")
def faces(tmp_path_factory) -> Path:
    train, _ = make_face_folders(tmp_path_factory.mktemp("split"), identities=10, images=5, test_identities=2)
    return train


@pytest.fixture(scope="module")
def written(faces, tmp_path_factory) -> tuple[Path, Path]:
    """The split files of ``faces`` with seed 0."""
    return write_split(make_identity_split(faces, seed=0, **SIZES), tmp_path_factory.mktemp("written"))


def _identity(path: str) -> str:
    return Path(path).parent.name


def test_same_seed_writes_identical_files_and_another_seed_other_identities(faces, written, tmp_path) -> None:
    again = write_split(make_identity_split(faces, seed=0, **SIZES), tmp_path / "again")
    for first, second in zip(written, again, strict=True):
        assert first.read_bytes() == second.read_bytes()
    other = make_identity_split(faces, seed=1, **SIZES)
    assert set(other.val_identities) != set(read_identity_list(written[0]))


def test_split_does_not_depend_on_the_file_system_listing_order(faces, written, tmp_path, monkeypatch) -> None:
    real_scandir = os.scandir

    def reversed_scandir(path):  # the same entries, listed in the opposite order
        with real_scandir(path) as entries:
            return list(entries)[::-1]

    monkeypatch.setattr(datasets_module.os, "scandir", reversed_scandir)
    reordered = write_split(make_identity_split(faces, seed=0, **SIZES), tmp_path / "reordered")
    for first, second in zip(written, reordered, strict=True):
        assert first.read_bytes() == second.read_bytes()


def test_training_set_with_the_exclusion_has_no_held_out_identity_and_contiguous_labels(faces, written) -> None:
    held = read_identity_list(written[0])
    full = open_training_set(faces)
    subset = open_training_set(faces, exclude=held)
    assert isinstance(subset, ImageFolderDataset) and len(held) == 3
    assert not {_identity(path) for path in subset.relative_paths} & set(held)
    assert subset.identities == sorted(set(full.identities) - set(held))
    assert subset.num_classes == full.num_classes - len(held) == 7
    assert len(subset) == len(full) - 5 * len(held)
    # Labels 0..C-1 follow the sorted identity names, one label per identity folder.
    assert np.array_equal(np.unique(subset.labels), np.arange(subset.num_classes))
    assert np.all(np.diff(subset.labels) >= 0)
    for path, label in zip(subset.relative_paths, subset.labels, strict=True):
        assert subset.identities[label] == _identity(path)


def test_fingerprint_records_the_exclusion_and_caches_of_one_set_are_refused_for_the_other(
    faces, written, tmp_path
) -> None:
    held = read_identity_list(written[0])
    full = ImageFolderDataset(faces)
    subset = ImageFolderDataset(faces, exclude=held)
    assert subset.fingerprint() != full.fingerprint()
    assert ImageFolderDataset(faces, exclude=[]).fingerprint() == full.fingerprint()  # nothing left out: same set
    assert ImageFolderDataset(faces, exclude=held[:1]).fingerprint() not in (full.fingerprint(), subset.fingerprint())

    teacher = ProjectionTeacher()
    full_cache = build_teacher_cache(teacher, full, tmp_path / "full", num_workers=0, progress=False)
    subset_cache = build_teacher_cache(teacher, subset, tmp_path / "subset", num_workers=0, progress=False)
    full_cache.check(full)
    subset_cache.check(subset)
    with pytest.raises(StaleCacheError, match="another dataset"):
        TeacherCache(tmp_path / "full").check(subset)
    with pytest.raises(StaleCacheError, match="another dataset"):
        TeacherCache(tmp_path / "subset").check(full)


def test_fingerprint_names_the_exclusion_even_when_the_images_are_the_same(tmp_path) -> None:
    # An excluded empty identity folder leaves the same images and labels but one class fewer: still another set.
    root = write_identity_folders(tmp_path / "faces", identities=2, images_per_identity=2)
    (root / "zz_empty").mkdir()
    full, subset = ImageFolderDataset(root), ImageFolderDataset(root, exclude=["zz_empty"])
    assert subset.relative_paths == full.relative_paths and np.array_equal(subset.labels, full.labels)
    assert (full.num_classes, subset.num_classes) == (3, 2)
    assert subset.fingerprint() != full.fingerprint()


def test_exclusion_errors_name_the_problem(faces, tmp_path) -> None:
    with pytest.raises(ValueError, match="not identity folders here: id_99999"):
        ImageFolderDataset(faces, exclude=["id_00001", "id_99999"])
    with pytest.raises(TypeError, match="read_identity_list"):
        ImageFolderDataset(faces, exclude="val_identities.txt")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="after excluding 10 identities"):
        ImageFolderDataset(faces, exclude=[f"id_{i:05d}" for i in range(10)])

    full = ImageFolderDataset(faces)
    samples = [(faces / rel, int(label)) for rel, label in zip(full.relative_paths, full.labels, strict=True)]
    pack_folder_to_recordio(samples, tmp_path / "rec", progress=False)
    with pytest.raises(ValueError, match="cannot exclude identities.*facedistill pack SRC DST --exclude"):
        open_training_set(tmp_path / "rec", exclude=["id_00001"])
    assert len(open_training_set(tmp_path / "rec", exclude=[])) == len(full)


def test_pairs_are_distinct_images_of_held_out_identities_balanced_per_fold(faces, written) -> None:
    identities_path, pairs_path = written
    held = set(read_identity_list(identities_path))
    lines = pairs_path.read_text().splitlines()
    assert lines[0] == "left\tright\tlabel\tfold"
    rows = [line.split("\t") for line in lines[1:]]
    assert len(rows) == 10 * 4
    seen = set()
    for left, right, label, _fold in rows:
        assert not Path(left).is_absolute() and (faces / left).is_file() and (faces / right).is_file()
        assert {_identity(left), _identity(right)} <= held
        assert left != right
        assert (label == "1") == (_identity(left) == _identity(right))
        assert frozenset((left, right)) not in seen
        seen.add(frozenset((left, right)))
    per_fold = Counter((int(fold), label) for _, _, label, fold in rows)
    assert per_fold == {(fold, label): 2 for fold in range(10) for label in ("0", "1")}
    # Folds are contiguous blocks in file order, as a .bin pack is read back.
    assert [int(row[3]) for row in rows] == sorted(int(row[3]) for row in rows)


def test_pairs_tsv_loads_with_the_existing_readers(faces, written) -> None:
    split = make_identity_split(faces, seed=0, **SIZES)
    pairs = read_pairs_tsv(written[1], faces, check_exists=True)
    assert pairs.left == [str(faces / path) for path in split.pairs.left]
    assert pairs.right == [str(faces / path) for path in split.pairs.right]
    assert np.array_equal(pairs.issame, split.pairs.issame) and np.array_equal(pairs.folds, split.pairs.folds)
    # data.val_pairs + data.val_images go through load_pairs_set.
    val = load_pairs_set(written[1], faces, name="val")
    assert len(val.pairs) == 40


def test_split_sizes_are_checked() -> None:
    with pytest.raises(ValueError, match="num_val_identities must be an integer >= 2"):
        make_identity_split(".", num_val_identities=1)


def test_identities_with_one_image_are_never_held_out(tmp_path) -> None:
    root = write_identity_folders(tmp_path / "faces", identities=3, images_per_identity=3)
    for extra in ("id_00001/001.jpg", "id_00001/002.jpg"):
        (root / extra).unlink()
    for seed in range(5):
        split = make_identity_split(root, num_val_identities=2, pairs_per_fold=1, num_folds=2, seed=seed)
        assert split.val_identities == ("id_00000", "id_00002")
    with pytest.raises(ValueError, match="only 2 of its 3 identity folders have the 2 images"):
        make_identity_split(root, num_val_identities=3, pairs_per_fold=1, num_folds=2)
    with pytest.raises(ValueError, match="only 6 distinct same-identity pairs, 20 needed; lower pairs_per_fold"):
        make_identity_split(root, num_val_identities=2, pairs_per_fold=2, num_folds=10)


def test_identity_list_errors_name_the_file_and_line(tmp_path) -> None:
    good = tmp_path / "ids.txt"
    good.write_text("# held out\nid_00002\n\n  id_00001  \n")
    assert read_identity_list(good) == ["id_00002", "id_00001"]
    with pytest.raises(FileNotFoundError, match=r"missing.txt does not exist; write one with `facedistill split"):
        read_identity_list(tmp_path / "missing.txt")
    cases = {
        "id_1\nid_2\nid_1\n": r"dup.txt:3: identity 'id_1' is listed again \(first on line 1\)",
        "id_1\nfaces/id_2\n": r"dup.txt:2: 'faces/id_2' is not an identity folder name",
        "# nothing\n\n": "names no identities",
    }
    for text, message in cases.items():
        (tmp_path / "dup.txt").write_text(text)
        with pytest.raises(ValueError, match=message):
            read_identity_list(tmp_path / "dup.txt")


def test_split_and_pack_commands(faces, written, tmp_path) -> None:
    out = tmp_path / "split"
    args = ["split", str(faces), str(out), "--val-identities", "3", "--pairs-per-fold", "2", "--seed", "0"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "3 held-out identities (15 images), 7 training identities (35 images); 40 pairs" in result.output
    assert (out / IDENTITIES_FILE).read_bytes() == written[0].read_bytes()
    assert (out / PAIRS_FILE).read_bytes() == written[1].read_bytes()
    again = runner.invoke(app, args)
    assert again.exit_code == 2 and "already exist" in again.output

    held = read_identity_list(out / IDENTITIES_FILE)
    result = runner.invoke(app, ["pack", str(faces), str(tmp_path / "rec"), "--exclude", str(out / IDENTITIES_FILE)])
    assert result.exit_code == 0, result.output
    assert "packed 35 images of 7 identities" in result.output and "3 identities of" in result.output
    subset = ImageFolderDataset(faces, exclude=held)
    with open_face_record(tmp_path / "rec") as record:
        assert record.num_classes == 7 and record.num_images == 35
        assert np.array_equal(record.labels, subset.labels)
        packed = {record.read_image_bytes(i) for i in range(record.num_images)}
    held_bytes = {path.read_bytes() for identity in held for path in (faces / identity).iterdir()}
    assert not packed & held_bytes
    assert packed == {(faces / rel).read_bytes() for rel in subset.relative_paths}

    # The pairs TSV's paths are relative to the image root given to pack.
    result = runner.invoke(
        app, ["pack", str(faces), str(tmp_path / "rec" / "val" / "v.bin"), "--pairs", str(out / PAIRS_FILE)]
    )
    assert result.exit_code == 0, result.output
    images, pairs = read_bin_pairs(tmp_path / "rec" / "val" / "v.bin")
    tsv = read_pairs_tsv(out / PAIRS_FILE, faces)
    assert np.array_equal(pairs.issame, tsv.issame) and np.array_equal(pairs.folds, tsv.folds)
    assert images[2] == Path(tsv.left[1]).read_bytes()

    bad = runner.invoke(app, ["pack", str(faces), str(tmp_path / "x"), "--exclude", str(tmp_path / "none.txt")])
    assert bad.exit_code == 2 and "none.txt does not exist" in bad.output


def test_cache_teacher_command_excludes_the_listed_identities(faces, written, tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(facedistill.teachers, "create_teacher", lambda spec, **keys: ProjectionTeacher())
    args = ["cache-teacher", "--teacher", "x", "--data", str(faces), "--out", str(tmp_path / "c"), "--workers", "0"]
    result = runner.invoke(app, [*args, "--exclude", str(written[0])])
    assert result.exit_code == 0, result.output
    TeacherCache(tmp_path / "c").check(ImageFolderDataset(faces, exclude=read_identity_list(written[0])))


class _Opened(Exception):
    """Stops a run right after it opened its training set."""


def _stop_at_open(monkeypatch, module: str, calls: list[dict]) -> None:
    def fake_open(path, *args, **kwargs):
        calls.append({"path": path, "exclude": kwargs.get("exclude")})
        raise _Opened

    monkeypatch.setattr(f"{module}.open_training_set", fake_open)


def test_training_and_compare_open_the_set_without_data_exclude_identities(faces, written, tmp_path, monkeypatch):
    from facedistill.pipeline import compare_methods
    from facedistill.train.loop import train

    held = read_identity_list(written[0])
    calls: list[dict] = []
    _stop_at_open(monkeypatch, "facedistill.train.loop", calls)
    overrides = [
        "method.name=arcface",
        "run.device=cpu",
        f"run.output_dir={tmp_path / 'run'}",
        f"data.train={faces}",
        f"data.exclude_identities={written[0]}",
    ]
    config = load_config(None, overrides)
    assert config.data.exclude_identities == str(written[0])
    assert load_config(None, []).data.exclude_identities is None
    with pytest.raises(_Opened):
        train(config, progress=False)
    assert calls == [{"path": str(faces), "exclude": held}]

    calls.clear()
    _stop_at_open(monkeypatch, "facedistill.pipeline", calls)
    with pytest.raises(_Opened):
        compare_methods(tmp_path / "cmp", faces, ProjectionTeacher(), written[1], faces, {}, config.to_dict())
    assert calls == [{"path": faces, "exclude": held}]


@pytest.mark.parametrize(
    ("folder", "held_out", "pairs_per_fold", "training_images"),
    [("celeba299", 30, 30, 5686), ("celeba299_49", 49, 100, 5256)],
)
def test_committed_celeba299_split_matches_the_shared_data(
    shared_data, tmp_path, folder: str, held_out: int, pairs_per_fold: int, training_images: int
) -> None:
    root = shared_data / "celeba299"
    if not root.is_dir():
        pytest.skip(f"{root} not found: the committed celeba299 split is checked against it")
    committed = COMMITTED.parent / folder
    held = read_identity_list(committed / IDENTITIES_FILE)
    assert len(held) == held_out and held == sorted(held)
    assert all((root / identity).is_dir() for identity in held)
    pairs = read_pairs_tsv(committed / PAIRS_FILE, root, check_exists=True)
    assert len(pairs) == 20 * pairs_per_fold and pairs.num_folds == 10
    for fold in range(10):
        fold_pairs = pairs.folds == fold
        assert int(pairs.issame[fold_pairs].sum()) == pairs_per_fold and int(fold_pairs.sum()) == 2 * pairs_per_fold
    for left, right, same in zip(pairs.left, pairs.right, pairs.issame, strict=True):
        assert left != right and {_identity(left), _identity(right)} <= set(held)
        assert same == (_identity(left) == _identity(right))
    training = ImageFolderDataset(root, exclude=held)
    assert training.num_classes == 299 - held_out and len(training) == training_images
    assert not {"7392", "7393", "7201"} & set(held)  # celeba299's known defects stay in training
    # The committed files are exactly what the documented command writes: neither the code nor the data drifted.
    split = make_identity_split(root, held_out, pairs_per_fold, num_folds=10, seed=0)
    regenerated = write_split(split, tmp_path)
    assert regenerated[0].read_bytes() == (committed / IDENTITIES_FILE).read_bytes()
    assert regenerated[1].read_bytes() == (committed / PAIRS_FILE).read_bytes()
    readme = (committed / "README.md").read_text()
    assert f"facedistill split ../shared/data/celeba299 recipes/splits/{folder} " in readme
