"""Protocol metadata readers on generated files in each dataset's real format (see the module doc for sources)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from facedistill.data.protocols import read_cfp, read_ijb, read_megaface
from facedistill.data.verification import PairsFormatError

# --- CFP -----------------------------------------------------------------------------------------------------


def _make_cfp(root: Path, newline: str = "\n") -> None:
    """4 frontal and 2 profile images of 2 identities; 2 splits per protocol."""
    protocol = root / "Protocol"
    protocol.mkdir(parents=True)
    frontal = [f"{i + 1} ../Data/Images/00{i // 2 + 1}/frontal/0{i % 2 + 1}.jpg" for i in range(4)]
    profile = [f"{i + 1} ../Data/Images/00{i + 1}/profile/01.jpg" for i in range(2)]
    (protocol / "Pair_list_F.txt").write_text(newline.join(frontal) + newline)
    (protocol / "Pair_list_P.txt").write_text(newline.join(profile) + newline + newline)  # trailing blank line
    splits = {
        ("FP", "01"): ("1,1\n2,1\n", "1,2\n"),
        ("FP", "02"): ("3,2\n", "4,1\n3,1\n"),
        ("FF", "01"): ("1,2\n", "1,3\n"),
        ("FF", "02"): ("3,4\n", "2, 4\n"),  # a space after the comma is tolerated
    }
    for (split, number), (same, diff) in splits.items():
        folder = protocol / "Split" / split / number
        folder.mkdir(parents=True)
        (folder / "same.txt").write_text(same.replace("\n", newline))
        (folder / "diff.txt").write_text(diff.replace("\n", newline))


def _image(root: Path, identity: int, view: str, number: int) -> str:
    return os.path.normpath(root / "Data" / "Images" / f"00{identity}" / view / f"0{number}.jpg")


@pytest.mark.parametrize("newline", ["\n", "\r\n"])
def test_cfp_fp_pairs_folds_and_order(tmp_path: Path, newline: str) -> None:
    _make_cfp(tmp_path, newline)
    pairs = read_cfp(tmp_path, "FP")
    f = [_image(tmp_path, 1, "frontal", 1), _image(tmp_path, 1, "frontal", 2)]
    f += [_image(tmp_path, 2, "frontal", 1), _image(tmp_path, 2, "frontal", 2)]
    p = [_image(tmp_path, 1, "profile", 1), _image(tmp_path, 2, "profile", 1)]
    # Fold 0 = split 01 (same, then diff), fold 1 = split 02.
    assert pairs.left == [f[0], f[1], f[0], f[2], f[3], f[2]]
    assert pairs.right == [p[0], p[0], p[1], p[1], p[0], p[0]]
    assert pairs.issame.tolist() == [True, True, False, True, False, False]
    assert pairs.folds.tolist() == [0, 0, 0, 1, 1, 1]


def test_cfp_ff_is_frontal_vs_frontal(tmp_path: Path) -> None:
    _make_cfp(tmp_path)
    pairs = read_cfp(tmp_path, "ff")
    f = [_image(tmp_path, i // 2 + 1, "frontal", i % 2 + 1) for i in range(4)]
    assert pairs.left == [f[0], f[0], f[2], f[1]]
    assert pairs.right == [f[1], f[2], f[3], f[3]]
    assert pairs.issame.tolist() == [True, False, True, False]
    assert pairs.folds.tolist() == [0, 0, 1, 1]


def test_cfp_aligned_dir_keeps_the_layout_below_data_images(tmp_path: Path) -> None:
    _make_cfp(tmp_path)
    aligned = tmp_path / "aligned"
    pairs = read_cfp(tmp_path, "FP", aligned_dir=aligned)
    assert pairs.left[0] == str(aligned / "001" / "frontal" / "01.jpg")
    assert pairs.right[2] == str(aligned / "002" / "profile" / "01.jpg")
    with pytest.raises(FileNotFoundError, match="do not exist"):
        read_cfp(tmp_path, "FP", aligned_dir=aligned, check_exists=True)


@pytest.mark.parametrize(
    ("file", "content", "message"),
    [
        ("Split/FP/02/diff.txt", "4,1\n3;1\n", r"diff\.txt:2: expected 'i,j'"),
        ("Split/FP/01/same.txt", "1,1\n2,3\n", r"same\.txt:2: index 3 is not in Pair_list_P\.txt"),
        ("Split/FP/01/same.txt", "9,1\n", r"same\.txt:1: index 9 is not in Pair_list_F\.txt"),
        ("Split/FP/01/same.txt", "\n", r"same\.txt: no pairs"),
        ("Pair_list_F.txt", "1 a.jpg\nx b.jpg\n", r"Pair_list_F\.txt:2: expected '<index> <path>'"),
        ("Pair_list_F.txt", "1 a.jpg\n1 b.jpg\n", r"Pair_list_F\.txt:2: index 1 is listed twice"),
        ("Pair_list_P.txt", "1 a.jpg extra\n", r"Pair_list_P\.txt:1: expected"),
    ],
)
def test_cfp_malformed_lines_name_file_and_line(tmp_path: Path, file: str, content: str, message: str) -> None:
    _make_cfp(tmp_path)
    (tmp_path / "Protocol" / file).write_text(content)
    with pytest.raises(PairsFormatError, match=message):
        read_cfp(tmp_path, "FP")


def test_cfp_split_folders_must_be_contiguous(tmp_path: Path) -> None:
    _make_cfp(tmp_path)
    (tmp_path / "Protocol" / "Split" / "FP" / "02").rename(tmp_path / "Protocol" / "Split" / "FP" / "03")
    with pytest.raises(PairsFormatError, match=r"numbered 1\.\.K without gaps, got \[1, 3\]"):
        read_cfp(tmp_path, "FP")
    with pytest.raises(ValueError, match="CFP split"):
        read_cfp(tmp_path, "PP")
    with pytest.raises(FileNotFoundError, match="Pair_list_F.txt"):
        read_cfp(tmp_path / "missing", "FP")


# --- IJB -----------------------------------------------------------------------------------------------------

# 6 images, 3 templates (11, 12, 13) with 2 medias each; pairs in the file's "t1 t2 label" form.
_TID_MID = ["1.jpg 11 100", "2.jpg 11 100", "3.jpg 11 101", "4.jpg 12 200", "5.jpg 13 300", "6.jpg 13 301"]
_PAIRS = ["11 12 1", "11 13 0", "12 13 0"]


def _pts(name: str, k: int) -> str:
    return " ".join([name] + [f"{k + 0.5 * j:.3f}" for j in range(10)] + [f"{0.9 + 0.01 * k:.3f}"])


def _make_ijb(root: Path, prefix: str = "ijbc", scores: bool = True) -> Path:
    meta = root / "meta"
    meta.mkdir(parents=True)
    (meta / f"{prefix}_face_tid_mid.txt").write_text("\n".join(_TID_MID) + "\n")
    (meta / f"{prefix}_template_pair_label.txt").write_text("\n".join(_PAIRS) + "\n")
    if scores:
        lines = [_pts(line.split()[0], k) for k, line in enumerate(_TID_MID)]
        (meta / f"{prefix}_name_5pts_score.txt").write_text("\n".join(lines) + "\n")
    return meta


def test_ijb_reads_the_insightface_meta_files(tmp_path: Path) -> None:
    _make_ijb(tmp_path)
    ijb = read_ijb(tmp_path, "IJBC")
    assert ijb.name == "IJBC"
    assert ijb.images == [str(tmp_path / "loose_crop" / f"{k}.jpg") for k in range(1, 7)]
    assert ijb.templates.tolist() == [11, 11, 11, 12, 13, 13]
    assert ijb.medias.tolist() == [100, 100, 101, 200, 300, 301]
    assert ijb.pairs_t1.tolist() == [11, 11, 12]
    assert ijb.pairs_t2.tolist() == [12, 13, 13]
    assert ijb.labels.dtype == bool and ijb.labels.tolist() == [True, False, False]
    assert ijb.scores is not None and ijb.landmarks is not None
    np.testing.assert_allclose(ijb.scores, [0.9 + 0.01 * k for k in range(6)], rtol=1e-6)
    assert ijb.landmarks.shape == (6, 5, 2)
    # Landmarks are x, y interleaved: point j of image k is (k + j, k + j + 0.5).
    np.testing.assert_allclose(ijb.landmarks[2, 1], [3.0, 3.5])


def test_ijb_layouts_aligned_dir_and_missing_scores(tmp_path: Path) -> None:
    _make_ijb(tmp_path / "IJBB", prefix="ijbb", scores=False)
    aligned = tmp_path / "aligned"
    # insightface's scripts take the folder above IJBB/: accepted too.
    ijb = read_ijb(tmp_path, "ijbb", aligned_dir=aligned)
    assert ijb.name == "IJBB"
    assert ijb.images[0] == str(aligned / "1.jpg")
    assert ijb.scores is None and ijb.landmarks is None
    assert read_ijb(tmp_path / "IJBB", "IJBB").images[5] == str(tmp_path / "IJBB" / "loose_crop" / "6.jpg")
    with pytest.raises(FileNotFoundError, match="no meta/ folder"):
        read_ijb(tmp_path, "IJBC")
    with pytest.raises(ValueError, match="IJB set"):
        read_ijb(tmp_path, "IJBA")


@pytest.mark.parametrize(
    ("file", "lines", "message"),
    [
        ("template_pair_label", ["11 12 1", "", "11 13 2"], r"pair_label\.txt:3: label must be 0 or 1"),
        ("template_pair_label", ["11 12 1", "11 x 0"], r"pair_label\.txt:2: expected '<template 1>"),
        ("template_pair_label", ["11 12 1", "11 13"], r"pair_label\.txt:2: expected"),
        ("template_pair_label", ["11 12 1", "12 99 0"], r"pair_label\.txt:2: template id not listed in"),
        ("template_pair_label", [], r"pair_label\.txt: file is empty"),
        ("face_tid_mid", ["1.jpg 11 100", "2.jpg 11"], r"tid_mid\.txt:2: expected '<image name> <template id>"),
        ("face_tid_mid", ["1.jpg 11 1a"], r"tid_mid\.txt:1: expected"),
        ("name_5pts_score", [_pts("1.jpg", 0)], r"5pts_score\.txt: 1 images, but ijbc_face_tid_mid\.txt lists 6"),
    ],
)
def test_ijb_malformed_lines_name_file_and_line(tmp_path: Path, file: str, lines: list[str], message: str) -> None:
    meta = _make_ijb(tmp_path)
    (meta / f"ijbc_{file}.txt").write_text("\n".join(lines) + "\n")
    with pytest.raises(PairsFormatError, match=message):
        read_ijb(tmp_path)


def test_ijb_score_file_must_follow_the_template_file_row_by_row(tmp_path: Path) -> None:
    meta = _make_ijb(tmp_path)
    lines = [_pts(line.split()[0], k) for k, line in enumerate(_TID_MID)]
    lines[3], lines[4] = lines[4], lines[3]
    (meta / "ijbc_name_5pts_score.txt").write_text("\n".join(lines) + "\n")
    with pytest.raises(PairsFormatError, match=r"5pts_score\.txt:4: image '5\.jpg', but row 4 .* is '4\.jpg'"):
        read_ijb(tmp_path)
    lines = [_pts(line.split()[0], k) for k, line in enumerate(_TID_MID)]
    lines[1] = lines[1].rsplit(" ", 1)[0]  # the detector score is missing
    (meta / "ijbc_name_5pts_score.txt").write_text("\n".join(lines) + "\n")
    with pytest.raises(PairsFormatError, match=r"5pts_score\.txt:2: expected '<image name> <10 landmark"):
        read_ijb(tmp_path)


# --- MegaFace-style --------------------------------------------------------------------------------------------


def test_megaface_lists(tmp_path: Path) -> None:
    (tmp_path / "probes.tsv").write_text("path\tidentity\na/1.jpg\tann\na/2.jpg\tann\n\nb/1.jpg\tbob\na/3.jpg\tann\n")
    (tmp_path / "distractors.txt").write_text("d/1.jpg\nd/2 with space.jpg\n")
    mf = read_megaface(tmp_path)
    assert mf.probe_images == [str(tmp_path / p) for p in ("a/1.jpg", "a/2.jpg", "b/1.jpg", "a/3.jpg")]
    assert mf.probe_ids.tolist() == [0, 0, 1, 0]
    assert mf.identities == ["ann", "bob"]
    assert mf.distractor_images == [str(tmp_path / "d/1.jpg"), str(tmp_path / "d/2 with space.jpg")]
    aligned = tmp_path / "aligned"
    assert read_megaface(tmp_path, aligned_dir=aligned).distractor_images[0] == str(aligned / "d/1.jpg")


@pytest.mark.parametrize(
    ("probes", "distractors", "error", "message"),
    [
        ("a.jpg\tann\nb.jpg ann\n", "d.jpg\n", PairsFormatError, r"probes\.tsv:2: expected 'path<TAB>identity'"),
        ("a.jpg\tann\nb.jpg\t\n", "d.jpg\n", PairsFormatError, r"probes\.tsv:2: expected"),
        ("a.jpg\tann\na.jpg\tbob\n", "d.jpg\n", PairsFormatError, r"probes\.tsv:2: a\.jpg is already listed on line 1"),
        ("path\tidentity\n", "d.jpg\n", PairsFormatError, r"probes\.tsv: no probe images"),
        ("a.jpg\tann\n", "d.jpg\nx.jpg\tann\n", PairsFormatError, r"distractors\.txt:2: expected one image path"),
        ("a.jpg\tann\n", "\n", PairsFormatError, r"distractors\.txt: no distractor images"),
        ("a.jpg\tann\n", None, FileNotFoundError, r"distractors\.txt: protocol file not found"),
    ],
)
def test_megaface_malformed_lines(
    tmp_path: Path, probes: str, distractors: str | None, error: type[Exception], message: str
) -> None:
    (tmp_path / "probes.tsv").write_text(probes)
    if distractors is not None:
        (tmp_path / "distractors.txt").write_text(distractors)
    with pytest.raises(error, match=message):
        read_megaface(tmp_path)
