from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from facedistill.data.verification import (
    PairList,
    PairsFormatError,
    UnsafePickleError,
    check_bin_folds,
    contiguous_folds,
    pack_pairs_to_bin,
    read_bin,
    read_bin_pairs,
    read_lfw_pairs,
    read_pairs_tsv,
    write_bin,
)

# --- .bin packs ------------------------------------------------------------------------------------


def _images(n: int) -> list[bytes]:
    return [f"\xff\xd8image{i}".encode("latin1") for i in range(n)]


def test_bin_round_trip(tmp_path: Path) -> None:
    images, issame = _images(40), [k % 3 == 0 for k in range(20)]
    path = tmp_path / "lfw.bin"
    write_bin(path, images, issame)
    # Plain python types, protocol 4: readable by insightface's own pickle.load.
    with open(path, "rb") as f:
        assert f.read(2) == b"\x80\x04"
    assert pickle.loads(path.read_bytes()) == (images, issame)
    got_images, got_issame = read_bin(path)
    assert got_images == images
    assert got_issame.dtype == bool and got_issame.tolist() == issame

    images2, pairs = read_bin_pairs(path)
    assert images2 == images
    assert pairs.left[:2] == ["bin:0", "bin:2"] and pairs.right[:2] == ["bin:1", "bin:3"]
    assert pairs.folds.tolist() == [k // 2 for k in range(20)]
    assert pairs.issame.tolist() == issame


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.system, (f"echo pwned > {self.marker}",)


def test_malicious_pickle_is_refused_and_not_executed(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.bin"
    path.write_bytes(pickle.dumps(([b"a", b"b"], [_Evil(marker)])))
    with pytest.raises(UnsafePickleError) as info:
        read_bin(path)
    message = str(info.value)
    assert str(path) in message and "system" in message and "could run arbitrary code" in message
    assert not marker.exists()

    for payload in (
        pickle.dumps((eval, ("1",))),
        pickle.dumps(([b"a", b"b"], [Path("x")])),
    ):
        path.write_bytes(payload)
        with pytest.raises(UnsafePickleError):
            read_bin(path)


def test_codecs_encode_only_for_latin1(tmp_path: Path) -> None:
    path = tmp_path / "p2.bin"
    # Python 3 writes bytes as _codecs.encode(text, 'latin1') under protocol 2.
    path.write_bytes(pickle.dumps(([b"\xff\xd8a", b"b"], [True]), protocol=2))
    assert read_bin(path)[0] == [b"\xff\xd8a", b"b"]
    evil = pickle.dumps(([b"a", b"b"], [True]), protocol=2).replace(b"latin1", b"rot_13")
    path.write_bytes(evil)
    with pytest.raises(UnsafePickleError, match="p2.bin: refused: .*encoding 'rot_13'"):
        read_bin(path)


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_numpy_bool_arrays_and_scalars_load(tmp_path: Path, protocol: int) -> None:
    images = _images(4)
    path = tmp_path / "np.bin"
    path.write_bytes(pickle.dumps((images, np.array([True, False])), protocol=protocol))
    got, issame = read_bin(path)
    assert got == images and issame.tolist() == [True, False]
    path.write_bytes(pickle.dumps((images, [np.bool_(False), np.bool_(True)]), protocol=protocol))
    assert read_bin(path)[1].tolist() == [False, True]


def test_default_protocol_numpy_pickle_loads(tmp_path: Path) -> None:
    path = tmp_path / "np.bin"
    path.write_bytes(pickle.dumps((_images(4), np.array([True, False]))))
    assert read_bin(path)[1].tolist() == [True, False]


def test_python2_pack_with_numpy_bools_loads(tmp_path: Path) -> None:
    # Hand-assembled Python 2 / numpy 1.x pickle (protocol 2, py2 str opcodes) of
    # (['abc', 'def'], numpy.array([True])), as old insightface packs were written.
    py2 = (
        b"\x80\x02(]q\x00(U\x03abcq\x01U\x03defq\x02e"
        b"cnumpy.core.multiarray\n_reconstruct\nq\x03cnumpy\nndarray\nq\x04K\x00\x85q\x05U\x01bq\x06\x87q\x07Rq\x08"
        b"(K\x01K\x01\x85q\x09cnumpy\ndtype\nq\x0aU\x02b1q\x0bK\x00K\x01\x87q\x0cRq\x0d"
        b"(K\x03U\x01|q\x0eNNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tq\x0fb\x89U\x01\x01q\x10tq\x11b"
        b"tq\x12."
    )
    path = tmp_path / "py2.bin"
    path.write_bytes(py2)
    images, issame = read_bin(path)
    assert images == [b"abc", b"def"] and issame.tolist() == [True]


@pytest.mark.parametrize(
    ("obj", "match"),
    [
        ([b"a", b"b", b"c"], "expected a pickled"),
        (([b"a", b"b", b"c"], [True]), "3 images for 1 pairs"),
        (([b"a", "b"], [True]), "image 1 is str"),
        (([b"a", b"b"], ["yes"]), "issame holds 'yes'"),
        ((b"ab", [True]), "images must be a list"),
    ],
)
def test_bin_structure_is_validated(tmp_path: Path, obj: object, match: str) -> None:
    path = tmp_path / "bad.bin"
    path.write_bytes(pickle.dumps(obj, protocol=4))
    with pytest.raises(PairsFormatError, match=match):
        read_bin(path)


def test_truncated_bin(tmp_path: Path) -> None:
    path = tmp_path / "t.bin"
    write_bin(path, _images(4), [True, False])
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(PairsFormatError, match="not a readable .bin pack"):
        read_bin(path)


def test_pack_pairs_to_bin_keeps_bytes(tmp_path: Path) -> None:
    files = []
    for i in range(6):
        f = tmp_path / f"img{i}.jpg"
        f.write_bytes(os.urandom(50 + i))
        files.append(str(f))
    left = [files[k % 6] for k in range(20)]
    right = [files[(k + 1) % 6] for k in range(20)]
    pairs = PairList(left, right, np.arange(20) % 2 == 0, contiguous_folds(20))
    out = pack_pairs_to_bin(pairs, tmp_path / "out.bin")
    images, issame = read_bin(out)
    assert images[0::2] == [Path(p).read_bytes() for p in left]
    assert images[1::2] == [Path(p).read_bytes() for p in right]
    assert issame.tolist() == pairs.issame.tolist()
    with pytest.warns(UserWarning, match="not 10 contiguous folds"):
        pack_pairs_to_bin(PairList(left, right, pairs.issame, np.arange(20) % 2), tmp_path / "o2.bin")


def test_a_pair_order_whose_folds_lack_a_kind_is_refused_when_packing(tmp_path: Path) -> None:
    image = tmp_path / "a.jpg"
    image.write_bytes(b"x")
    names = [str(image)] * 40
    # LFW's layout (each tenth: 2 genuine then 2 impostor) packs; the same pairs sorted genuine-first do not:
    # the framework's verification would divide by a zero impostor count in the first folds.
    lfw_order = np.tile([True, True, False, False], 10)
    pack_pairs_to_bin(PairList(names, names, lfw_order, contiguous_folds(40)), tmp_path / "ok.bin")
    sorted_order = np.sort(lfw_order)[::-1]
    with pytest.raises(PairsFormatError, match=r"pairs 0-3 \(fold 1 of 10\) hold no impostor pair; .*pairs.txt"):
        pack_pairs_to_bin(PairList(names, names, sorted_order, contiguous_folds(40)), tmp_path / "bad.bin")
    assert not (tmp_path / "bad.bin").exists()
    with pytest.raises(PairsFormatError, match="12 pairs, fewer than 20"):
        check_bin_folds(lfw_order[:12], "few.bin")


@pytest.mark.parametrize("num_pairs", [20, 23, 6000])
def test_every_contiguous_fold_with_both_kinds_passes(num_pairs: int) -> None:
    issame = np.zeros(num_pairs, dtype=bool)
    for fold in range(10):
        issame[np.flatnonzero(contiguous_folds(num_pairs) == fold)[0]] = True
    check_bin_folds(issame, "x.bin")
    issame[np.flatnonzero(contiguous_folds(num_pairs) == 9)[0]] = False
    with pytest.raises(PairsFormatError, match="fold 10 of 10\\) hold no genuine pair"):
        check_bin_folds(issame, "x.bin")


# --- PairList --------------------------------------------------------------------------------------


def test_pairlist_unique_images_and_indices() -> None:
    pairs = PairList(["a", "b", "a"], ["b", "c", "c"], np.array([1, 0, 0]), np.array([0, 1, 1]))
    assert pairs.unique_images() == ["a", "b", "c"]
    images, li, ri = pairs.index_arrays()
    assert [images[i] for i in li] == pairs.left and [images[i] for i in ri] == pairs.right
    assert pairs.num_folds == 2 and len(pairs) == 3
    with pytest.raises(ValueError, match="disagree in length"):
        PairList(["a"], ["b", "c"], np.array([True]), np.array([0]))


def test_contiguous_folds_match_kfold() -> None:
    assert contiguous_folds(6000).tolist() == np.repeat(np.arange(10), 600).tolist()
    # sklearn KFold(10, shuffle=False): the first n % 10 folds get the extra samples.
    assert np.bincount(contiguous_folds(23)).tolist() == [3, 3, 3, 2, 2, 2, 2, 2, 2, 2]


@pytest.mark.parametrize("n", [10, 23, 6000, 7001])
def test_contiguous_folds_equal_sklearn_kfold(n: int) -> None:
    model_selection = pytest.importorskip("sklearn.model_selection")
    folds = contiguous_folds(n)
    for k, (_, test) in enumerate(model_selection.KFold(n_splits=10, shuffle=False).split(np.arange(n))):
        assert np.flatnonzero(folds == k).tolist() == test.tolist()


# --- LFW pairs.txt ---------------------------------------------------------------------------------


def test_real_lfw_pairs(shared_data: Path) -> None:
    pairs_file, image_root = shared_data / "lfw_pairs.txt", shared_data / "lfw"
    if not pairs_file.is_file() or not image_root.is_dir():
        pytest.skip(f"LFW pairs or images missing under {shared_data}")
    pairs = read_lfw_pairs(pairs_file, image_root)  # check_exists=True: every image is there
    assert len(pairs) == 6000
    assert int(pairs.issame.sum()) == 3000
    assert pairs.num_folds == 10
    for fold in range(10):
        block = slice(600 * fold, 600 * (fold + 1))
        assert (pairs.folds[block] == fold).all()
        assert pairs.issame[block].tolist() == [True] * 300 + [False] * 300
    first = pairs_file.read_text().splitlines()[1].split()  # "Abel_Pacheco 1 4"
    assert pairs.left[0] == str(image_root / first[0] / f"{first[0]}_{int(first[1]):04d}.jpg")
    assert pairs.right[0] == str(image_root / first[0] / f"{first[0]}_{int(first[2]):04d}.jpg")
    assert all(Path(p).is_file() for p in pairs.unique_images())


def _lfw_tree(root: Path) -> None:
    for name, count in (("Ann_A", 3), ("Bob_B", 2), ("Cy_C", 1)):
        (root / name).mkdir(parents=True)
        for i in range(1, count + 1):
            (root / name / f"{name}_{i:04d}.jpg").write_bytes(b"x")


GOOD = "2\t1\nAnn_A\t1\t2\nAnn_A\t1\tBob_B\t1\nBob_B 1 2\nAnn_A 3 Cy_C 1\n"


def test_small_lfw_pairs_file(tmp_path: Path) -> None:
    _lfw_tree(tmp_path / "img")
    (tmp_path / "pairs.txt").write_text(GOOD)
    pairs = read_lfw_pairs(tmp_path / "pairs.txt", tmp_path / "img")
    assert pairs.issame.tolist() == [True, False, True, False]
    assert pairs.folds.tolist() == [0, 0, 1, 1]
    assert pairs.right[1] == str(tmp_path / "img" / "Bob_B" / "Bob_B_0001.jpg")


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("", "file is empty"),
        ("two 1\n", r"pairs.txt:1: expected '<folds> <pairs per class per fold>'"),
        ("2\t1\nAnn_A\t1\t2\n", "header says 2 fold.* = 4 pair lines, but the file has 1"),
        (GOOD.replace("Ann_A\t1\tBob_B\t1", "Ann_A\t1\tBob_B"), r"pairs.txt:3: expected 'name1 i name2 j'"),
        (GOOD.replace("Bob_B 1 2", "Bob_B 1 x"), r"pairs.txt:4: expected 'name i j' .* pair 1 of fold 2"),
        (GOOD.replace("Bob_B 1 2", "Bob_B 1 0"), r"pairs.txt:4:"),
    ],
)
def test_malformed_lfw_pairs(tmp_path: Path, text: str, match: str) -> None:
    _lfw_tree(tmp_path / "img")
    (tmp_path / "pairs.txt").write_text(text)
    with pytest.raises(PairsFormatError, match=match):
        read_lfw_pairs(tmp_path / "pairs.txt", tmp_path / "img")


def test_lfw_missing_images_are_listed(tmp_path: Path) -> None:
    _lfw_tree(tmp_path / "img")
    (tmp_path / "pairs.txt").write_text(GOOD.replace("Cy_C 1", "Cy_C 7").replace("Bob_B 1 2", "Bob_B 1 9"))
    with pytest.raises(FileNotFoundError, match=r"2 image\(s\) named by the pairs do not exist") as info:
        read_lfw_pairs(tmp_path / "pairs.txt", tmp_path / "img")
    assert "Cy_C_0007.jpg" in str(info.value) and "Bob_B_0009.jpg" in str(info.value)
    assert len(read_lfw_pairs(tmp_path / "pairs.txt", tmp_path / "img", check_exists=False)) == 4


# --- TSV pairs -------------------------------------------------------------------------------------


def test_tsv_with_header_and_default_folds(tmp_path: Path) -> None:
    lines = ["left\tright\tissame"] + [f"a{k}.jpg\tb{k}.jpg\t{k % 2}" for k in range(20)]
    (tmp_path / "pairs.tsv").write_text("\n".join(lines) + "\n")
    pairs = read_pairs_tsv(tmp_path / "pairs.tsv")
    assert len(pairs) == 20
    assert pairs.left[3] == str(tmp_path / "a3.jpg")
    assert pairs.issame.tolist() == [k % 2 == 1 for k in range(20)]
    assert pairs.folds.tolist() == [k // 2 for k in range(20)]
    pairs = read_pairs_tsv(tmp_path / "pairs.tsv", image_root="/data/faces")
    assert pairs.right[0] == str(Path("/data/faces/b0.jpg"))


def test_tsv_with_fold_column_and_absolute_paths(tmp_path: Path) -> None:
    text = "/abs/a.jpg\tb.jpg\t1\t0\nc.jpg\td.jpg\t0\t1\ne.jpg\tf.jpg\t1\t1\n"
    (tmp_path / "p.tsv").write_text(text)
    pairs = read_pairs_tsv(tmp_path / "p.tsv", num_folds=99)
    assert pairs.left[0] == "/abs/a.jpg" and pairs.right[0] == str(tmp_path / "b.jpg")
    assert pairs.folds.tolist() == [0, 1, 1] and pairs.num_folds == 2


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("a\tb\t1\nc\td\t2\n", r"p.tsv:2: label must be 0 or 1"),
        ("a\tb\t2\nc\td\t1\n", r"p.tsv:1: label must be 0 or 1"),
        ("a\tb\t1\t0\nc\td\t0\n", r"p.tsv:2: expected 4 tab-separated columns"),
        ("a\tb\t1\t0\nc\td\t0\t2\n", "fold column must use every fold 0..K-1"),
        ("a\tb\t1\t0\nc\td\t0\t-1\n", r"p.tsv:2: fold must be a non-negative integer"),
        ("a\tb\t1\n", "1 pairs cannot be split into 10 folds"),
        ("# only a comment\n", "no pairs found"),
    ],
)
def test_malformed_tsv(tmp_path: Path, text: str, match: str) -> None:
    (tmp_path / "p.tsv").write_text(text)
    with pytest.raises(PairsFormatError, match=match):
        read_pairs_tsv(tmp_path / "p.tsv")
