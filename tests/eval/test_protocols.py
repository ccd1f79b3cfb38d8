"""Protocol scoring: hand-computed IJB templates, insightface's loops transcribed as references, exact rank-1."""

from __future__ import annotations

import json
import math
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from facedistill.data.protocols import IJBProtocol, MegaFaceProtocol
from facedistill.eval.protocols import (
    _embed_raw,
    _file_reader,
    evaluate_protocol,
    ijb_verification,
    load_protocol,
    megaface_rank1,
    megaface_trials,
    tar_at_far_nearest,
    template_features,
    template_pair_scores,
)
from facedistill.eval.verify import embed_keys

# ------------------------------------------------------------------------------------------------------------
# References transcribed from insightface recognition/_evaluation_/ijb/ijb_11.py (loops kept on purpose)
# ------------------------------------------------------------------------------------------------------------


def _insightface_image2template_feature(img_feats, templates, medias):
    unique_templates = np.unique(templates)
    template_feats = np.zeros((len(unique_templates), img_feats.shape[1]))
    for count_template, uqt in enumerate(unique_templates):
        (ind_t,) = np.where(templates == uqt)
        face_norm_feats = img_feats[ind_t]
        face_medias = medias[ind_t]
        unique_medias, unique_media_counts = np.unique(face_medias, return_counts=True)
        media_norm_feats = []
        for u, ct in zip(unique_medias, unique_media_counts, strict=True):
            (ind_m,) = np.where(face_medias == u)
            if ct == 1:
                media_norm_feats += [face_norm_feats[ind_m]]
            else:
                media_norm_feats += [np.mean(face_norm_feats[ind_m], axis=0, keepdims=True)]
        template_feats[count_template] = np.sum(np.array(media_norm_feats), axis=0)
    norm = np.linalg.norm(template_feats, axis=1, keepdims=True)  # sklearn.preprocessing.normalize
    return np.divide(template_feats, norm, out=np.zeros_like(template_feats), where=norm > 0), unique_templates


def _insightface_tpr_table(label, score, x_labels):
    from sklearn.metrics import roc_curve as sk_roc_curve

    fpr, tpr, _ = sk_roc_curve(label, score)
    fpr = np.flipud(fpr)
    tpr = np.flipud(tpr)
    row = []
    for x in x_labels:
        _, min_index = min(list(zip(abs(fpr - x), range(len(fpr)), strict=True)))
        row.append(tpr[min_index])
    return row


# ------------------------------------------------------------------------------------------------------------
# Template features
# ------------------------------------------------------------------------------------------------------------

# 3 templates x 2 medias. Media 100 appears in templates 11 and 13: a separate media in each.
_FEATS = np.array(
    [[1.0, 0.0], [3.0, 0.0], [0.0, 2.0], [0.0, 5.0], [3.0, -1.0], [1.0, -3.0], [-1.0, 0.0], [-1.0, 0.0], [-3.0, 0.0]]
)
_TEMPLATES = np.array([11, 11, 11, 12, 12, 12, 13, 13, 13])
_MEDIAS = np.array([100, 100, 101, 200, 201, 201, 100, 301, 301])


def test_template_features_by_hand() -> None:
    ids, feats = template_features(_FEATS, _TEMPLATES, _MEDIAS)
    assert ids.tolist() == [11, 12, 13]
    # 11: mean((1,0),(3,0)) + (0,2) = (2,2); 12: (0,5) + mean((3,-1),(1,-3)) = (2,3); 13: (-1,0) + (-2,0) = (-3,0)
    expected = np.array([[2.0, 2.0], [2.0, 3.0], [-3.0, 0.0]])
    np.testing.assert_allclose(feats, expected / np.linalg.norm(expected, axis=1, keepdims=True))


def test_template_features_with_detector_scores_by_hand() -> None:
    scores = np.array([0.5, 1.0, 1.0, 0.2, 1.0, 0.0, 1.0, 1.0, 1.0])
    ids, feats = template_features(_FEATS, _TEMPLATES, _MEDIAS, scores)
    # 11: mean((0.5,0),(3,0)) + (0,2) = (1.75,2); 12: (0,1) + mean((3,-1),(0,0)) = (1.5,0.5); 13 unchanged.
    expected = np.array([[1.75, 2.0], [1.5, 0.5], [-3.0, 0.0]])
    np.testing.assert_allclose(feats, expected / np.linalg.norm(expected, axis=1, keepdims=True))


def test_template_features_match_insightface_in_any_row_order() -> None:
    rng = np.random.default_rng(0)
    n = 400
    feats = rng.normal(size=(n, 16)).astype(np.float32)
    templates = rng.choice([7, 3, 1000, 42, 5, 99, 8], size=n)
    medias = rng.integers(0, 12, size=n)
    scores = rng.uniform(0.1, 1.0, size=n).astype(np.float32)
    want, want_ids = _insightface_image2template_feature(feats * scores[:, None], templates, medias)
    perm = rng.permutation(n)
    ids, got = template_features(feats[perm], templates[perm], medias[perm], scores[perm])
    assert ids.tolist() == want_ids.tolist()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_template_features_zero_sum_stays_zero_and_shapes_are_checked() -> None:
    ids, feats = template_features(np.array([[1.0, 1.0], [-1.0, -1.0]]), np.array([4, 4]), np.array([1, 2]))
    assert ids.tolist() == [4] and feats.tolist() == [[0.0, 0.0]]
    with pytest.raises(ValueError, match="expected image_features"):
        template_features(np.zeros((3, 2)), np.zeros(2), np.zeros(3))
    with pytest.raises(ValueError, match="detector scores"):
        template_features(np.zeros((3, 2)), np.zeros(3), np.zeros(3), np.ones(2))


# ------------------------------------------------------------------------------------------------------------
# IJB verification
# ------------------------------------------------------------------------------------------------------------


def _templates_with_scores(scores: list[float]) -> tuple[np.ndarray, np.ndarray]:
    """Template 100 = (1, 0) and template k = (s, sqrt(1 - s^2)): pair (100, k) scores s."""
    feats = [[1.0, 0.0]] + [[s, math.sqrt(1.0 - s * s)] for s in scores]
    ids = [100] + [90 - k for k in range(len(scores))]  # unsorted ids on purpose
    return np.array(ids), np.array(feats)


def test_ijb_verification_by_hand() -> None:
    # Genuine pairs score 0.9 and 0.5, impostors 0.8, 0.3, 0.1 and 0.0.
    ids, feats = _templates_with_scores([0.9, 0.5, 0.8, 0.3, 0.1, 0.0])
    t2 = ids[1:]
    labels = np.array([1, 1, 0, 0, 0, 0])
    np.testing.assert_allclose(
        template_pair_scores(ids, feats, np.full(6, 100), t2), [0.9, 0.5, 0.8, 0.3, 0.1, 0.0], atol=1e-12
    )
    out = ijb_verification(ids, feats, np.full(6, 100), t2, labels, fars=(0.1, 0.2, 0.3))
    json.dumps(out, allow_nan=False)
    assert (out["num_pairs"], out["num_genuine"], out["num_impostor"], out["num_templates"]) == (6, 2, 4, 7)
    # 4 impostors resolve FAR >= 0.25 only; at 0.3 accepting >= 0.5 gives FAR 1/4 and both genuine pairs.
    assert out["tar_at_far"] == {"0.1": None, "0.2": None, "0.3": 1.0}
    # insightface's nearest point: FAR 0 (TAR 0.5) for 0.1; FAR 0.25 (the higher TAR 1.0 of that FPR) for 0.2.
    assert out["tar_at_far_nearest"] == {"0.1": 0.5, "0.2": 1.0, "0.3": 1.0}
    assert out["auc"] == pytest.approx(0.875)  # 7 of 8 (genuine, impostor) orderings are right
    assert out["roc_fpr"][0] == 0.0 and out["roc_tpr"][-1] == 1.0


def test_tar_at_far_nearest_matches_insightface_table() -> None:
    pytest.importorskip("sklearn")
    from facedistill.eval.metrics import roc_curve

    rng = np.random.default_rng(1)
    labels = rng.random(5000) < 0.1
    scores = np.round(rng.normal(labels * 1.5, 1.0), 2)  # rounding makes ties, as low-precision features would
    fars = (1e-4, 3e-4, 1e-3, 1e-2, 0.05, 0.1, 0.5)
    fpr, tpr, _ = roc_curve(scores, labels, drop_intermediate=True)
    ours = tar_at_far_nearest(fpr, tpr, fars)
    assert list(ours.values()) == pytest.approx(_insightface_tpr_table(labels.astype(int), scores, fars))


def test_template_pair_scores_chunks_and_unknown_templates(monkeypatch: pytest.MonkeyPatch) -> None:
    import facedistill.eval.protocols as protocols

    rng = np.random.default_rng(2)
    ids = rng.permutation(np.arange(10, 40))
    feats = rng.normal(size=(30, 8))
    p1, p2 = rng.choice(ids, 101), rng.choice(ids, 101)
    row = {int(t): k for k, t in enumerate(ids)}
    want = np.array([feats[row[a]] @ feats[row[b]] for a, b in zip(p1, p2, strict=True)])
    monkeypatch.setattr(protocols, "_CHUNK_ELEMENTS", 8 * 7)  # 7 pairs per chunk
    np.testing.assert_allclose(template_pair_scores(ids, feats, p1, p2), want)
    with pytest.raises(ValueError, match=r"pairs_t2\[1\] = 5 is not among the template ids"):
        template_pair_scores(ids, feats, p1[:3], np.array([10, 5, 11]))


# ------------------------------------------------------------------------------------------------------------
# MegaFace-style rank-1
# ------------------------------------------------------------------------------------------------------------


def _e(*weights: tuple[int, float], d: int = 10) -> np.ndarray:
    v = np.zeros(d)
    for axis, w in weights:
        v[axis] = w
    return v / np.linalg.norm(v)


def _megaface_example() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """3 identities x 3 images + a single-image identity, 5 distractors; exactly 10 of 18 trials succeed.

    A sits on axis 0, far from every distractor: 6 of 6. B: b1 = e3, b2 ~ e3 + e4, b3 ~ e3 + e5 (mutual
    cosines 0.71, 0.71, 0.5); distractor d1 ~ e4 + 0.1 e3 is nearer b2 (0.77) than b1 or b3 are, so the two
    trials with b2 as probe fail and the other four succeed: 4 of 6. C's images have cosines <= 0 with each
    other while d2 = e6 and d3 = e7 are at 0.71 from every one of them: 0 of 6. D (one image) has no trial.
    """
    probes = np.stack(
        [
            _e((0, 1.0)),
            _e((0, 1.0), (1, 0.1)),
            _e((0, 1.0), (2, 0.1)),
            _e((3, 1.0)),
            _e((3, 1.0), (4, 1.0)),
            _e((3, 1.0), (5, 1.0)),
            _e((6, 1.0), (7, 1.0)),
            _e((6, 1.0), (7, -1.0)),
            _e((6, -1.0), (7, 1.0)),
            _e((0, 1.0), (1, 1.0)),
        ]
    )
    ids = np.array([0, 0, 0, 1, 1, 1, 2, 2, 2, 3])
    distractors = np.stack([_e((4, 1.0), (3, 0.1)), _e((6, 1.0)), _e((7, 1.0)), _e((8, 1.0)), _e((9, 1.0))])
    return probes, ids, distractors


@pytest.mark.parametrize("chunk_size", [None, 1, 4])
def test_megaface_rank1_exact_count(chunk_size: int | None) -> None:
    probes, ids, distractors = _megaface_example()
    assert megaface_trials(probes, ids, distractors, chunk_size) == (10, 18)
    # Scale does not matter (cosine) and neither does the dtype of the distractors.
    scaled = megaface_rank1(probes * 3.0, ids, (distractors * 7.0).astype(np.float32), chunk_size)
    assert scaled == pytest.approx(10 / 18)


def _brute_force_rank1(probes: np.ndarray, ids: np.ndarray, distractors: np.ndarray) -> float:
    p = probes / np.linalg.norm(probes, axis=1, keepdims=True)
    d = distractors / np.linalg.norm(distractors, axis=1, keepdims=True)
    hits = trials = 0
    for g in range(len(ids)):
        for q in range(len(ids)):
            if q == g or ids[q] != ids[g]:
                continue
            gallery = np.vstack([p[g], d])
            hits += int(np.argmax(gallery @ p[q]) == 0)
            trials += 1
    return hits / trials


def test_megaface_rank1_matches_brute_force() -> None:
    rng = np.random.default_rng(3)
    centres = rng.normal(size=(6, 12))
    ids = rng.integers(0, 6, size=40)
    probes = centres[ids] + rng.normal(scale=1.2, size=(40, 12))
    distractors = rng.normal(size=(200, 12))
    got = megaface_rank1(probes, ids, distractors, chunk_size=7)
    assert got == pytest.approx(_brute_force_rank1(probes, ids, distractors))
    assert 0.0 < got < 1.0


def test_megaface_ties_count_as_misses_and_errors() -> None:
    probes = np.array([[1.0, 0.0], [1.0, 0.0]])
    # Gallery item and distractor are equally near: argmax-style tie-breaking would be arbitrary, so it misses.
    assert megaface_rank1(probes, np.array([0, 0]), np.array([[2.0, 0.0]])) == 0.0
    assert megaface_rank1(probes, np.array([0, 0]), np.array([[0.0, 1.0]])) == 1.0
    with pytest.raises(ValueError, match="no probe identity has two or more images"):
        megaface_rank1(probes, np.array([0, 1]), np.array([[0.0, 1.0]]))
    with pytest.raises(ValueError, match="do not match probe dimension"):
        megaface_rank1(probes, np.array([0, 0]), np.zeros((3, 3)))


# ------------------------------------------------------------------------------------------------------------
# End to end on a few tiny image files
# ------------------------------------------------------------------------------------------------------------

# Left half / right half colours (RGB) of 6 images.
_HALVES = [
    ((200, 10, 10), (180, 20, 10)),
    ((190, 30, 20), (200, 10, 40)),
    ((10, 200, 10), (30, 180, 20)),
    ((20, 190, 40), (10, 210, 10)),
    ((10, 10, 200), (40, 30, 170)),
    ((120, 120, 10), (10, 120, 120)),
]


def _embedder(images: torch.Tensor) -> torch.Tensor:
    """Channel means plus the left half's red mean: the last entry shows whether the mirror was added."""
    x = images.float()
    return torch.cat([x.mean(dim=(2, 3)), x[:, 0, :, :56].mean(dim=(1, 2))[:, None]], dim=1) / 10.0


def _expected_raw(k: int) -> np.ndarray:
    (left, right) = _HALVES[k]
    means = (np.array(left, dtype=np.float64) + np.array(right)) / 2
    return np.r_[2 * means, left[0] + right[0]] / 10.0  # image + mirror


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("faces")
    for k, (left, right) in enumerate(_HALVES):
        rgb = np.zeros((112, 112, 3), dtype=np.uint8)
        rgb[:, :56], rgb[:, 56:] = left, right
        assert cv2.imwrite(str(folder / f"{k + 1}.png"), rgb[:, :, ::-1].copy())
    return folder


def test_embed_raw_recovers_the_unnormalised_flip_sum(image_dir: Path) -> None:
    keys = [str(image_dir / f"{k + 1}.png") for k in range(6)]
    reader = _file_reader("t")
    raw = _embed_raw(_embedder, reader, keys, True, 4, 0, False)
    np.testing.assert_allclose(raw, np.stack([_expected_raw(k) for k in range(6)]), rtol=1e-5)
    unit = embed_keys(_embedder, reader, keys, True, 4, 0, False)
    np.testing.assert_allclose(raw / np.linalg.norm(raw, axis=1, keepdims=True), unit, rtol=1e-5, atol=1e-6)
    single = _embed_raw(_embedder, reader, keys[:1], False, 4, 0, False)
    np.testing.assert_allclose(single[0, :3], _expected_raw(0)[:3] / 2, rtol=1e-5)


def test_evaluate_protocol_ijb(image_dir: Path) -> None:
    templates, medias = np.array([1, 1, 2, 2, 3, 3]), np.array([10, 10, 20, 21, 30, 31])
    scores = np.array([0.9, 0.5, 1.0, 0.8, 0.7, 0.95])
    ijb = IJBProtocol(
        images=[str(image_dir / f"{k + 1}.png") for k in range(6)],
        templates=templates,
        medias=medias,
        pairs_t1=np.array([1, 1, 2, 3]),
        pairs_t2=np.array([2, 3, 3, 3]),
        labels=np.array([0, 0, 0, 1]),
        scores=scores,
        name="IJBB",
    )
    kw = {"batch_size": 4, "num_workers": 0, "progress": False}
    out = evaluate_protocol(_embedder, ijb, fars=(0.5,), **kw)
    json.dumps(out, allow_nan=False)
    raw = np.stack([_expected_raw(k) for k in range(6)])
    want = ijb_verification(
        *template_features(raw, templates, medias, scores), ijb.pairs_t1, ijb.pairs_t2, ijb.labels, fars=(0.5,)
    )
    assert out["protocol"] == "ijbb" and out["kind"] == "ijb" and out["num_images"] == 6
    assert out["keep_feature_norm"] is True and out["detector_scores"] is True
    assert out["tar_at_far"] == want["tar_at_far"] and out["num_templates"] == 3
    np.testing.assert_allclose(out["roc_tpr"], want["roc_tpr"])

    unit_out = evaluate_protocol(_embedder, ijb, keep_feature_norm=False, use_detector_scores=False, **kw)
    unit = raw / np.linalg.norm(raw, axis=1, keepdims=True)
    unit_want = ijb_verification(*template_features(unit, templates, medias), ijb.pairs_t1, ijb.pairs_t2, ijb.labels)
    assert unit_out["detector_scores"] is False
    np.testing.assert_allclose(unit_out["roc_fpr"], unit_want["roc_fpr"])
    assert set(unit_out["tar_at_far"]) == {"1e-06", "1e-05", "0.0001", "0.001", "0.01", "0.1"}


def test_evaluate_protocol_megaface_and_cfp(image_dir: Path, tmp_path: Path) -> None:
    # Identity "r" = images 1, 2 (red), "g" = 3, 4 (green); distractors: blue (5) and yellow-ish (6).
    (tmp_path / "probes.tsv").write_text("1.png\tr\n2.png\tr\n3.png\tg\n4.png\tg\n")
    (tmp_path / "distractors.txt").write_text("5.png\n6.png\n")
    protocol = load_protocol("megaface", tmp_path, aligned_dir=image_dir)
    assert isinstance(protocol, MegaFaceProtocol)
    out = evaluate_protocol(_embedder, protocol, batch_size=4, num_workers=0, progress=False)
    json.dumps(out, allow_nan=False)
    assert out == {
        "protocol": "megaface",
        "kind": "identification",
        "rank1": 1.0,
        "num_trials": 4,
        "num_identities": 2,
        "num_probe_images": 4,
        "num_distractors": 2,
    }
    # A file both probe (of a one-image identity, so without trials) and distractor is embedded once.
    (tmp_path / "probes.tsv").write_text("1.png\tr\n2.png\tr\n3.png\tg\n4.png\tg\n6.png\tsolo\n")
    protocol = load_protocol("megaface", tmp_path, aligned_dir=image_dir)
    again = evaluate_protocol(_embedder, protocol, batch_size=4, num_workers=0, progress=False)
    assert again == {**out, "num_probe_images": 5}

    root = tmp_path / "cfp"
    (root / "Protocol" / "Split" / "FP" / "01").mkdir(parents=True)
    (root / "Protocol" / "Split" / "FP" / "02").mkdir(parents=True)
    (root / "Protocol" / "Pair_list_F.txt").write_text("1 ../Data/Images/1.png\n2 ../Data/Images/3.png\n")
    (root / "Protocol" / "Pair_list_P.txt").write_text("1 ../Data/Images/2.png\n2 ../Data/Images/4.png\n")
    for fold, (same, diff) in enumerate([("1,1", "1,2"), ("2,2", "2,1")], start=1):
        (root / "Protocol" / "Split" / "FP" / f"0{fold}" / "same.txt").write_text(same + "\n")
        (root / "Protocol" / "Split" / "FP" / f"0{fold}" / "diff.txt").write_text(diff + "\n")
    cfp = load_protocol("cfp-fp", root, aligned_dir=image_dir)
    out = evaluate_protocol(_embedder, cfp, batch_size=4, num_workers=0, progress=False, fars=(0.5,))
    json.dumps(out, allow_nan=False)
    assert out["protocol"] == "cfp_fp" and out["kind"] == "verification"
    assert out["num_pairs"] == 4 and len(out["fold_accuracies"]) == 2
    assert out["accuracy_mean"] == 1.0 and out["tar_at_far"] == {"0.5": 1.0}


def test_load_protocol_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown protocol"):
        load_protocol("agedb", tmp_path)
    with pytest.raises(ValueError, match="needs a pairs file"):
        load_protocol("pairs")
    with pytest.raises(ValueError, match="needs the dataset root"):
        load_protocol("ijbc")
    with pytest.raises(TypeError, match="cannot evaluate a str"):
        evaluate_protocol(_embedder, "lfw")  # type: ignore[arg-type]
