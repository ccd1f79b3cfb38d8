"""Verification metrics vs an independent re-implementation of insightface's protocol and vs sklearn."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score
from sklearn.metrics import roc_curve as sk_roc_curve
from sklearn.model_selection import KFold
from sklearn.preprocessing import normalize

from facedistill.eval.metrics import (
    VerificationResult,
    auc,
    contiguous_folds,
    cosine_similarity,
    format_tar,
    kfold_accuracy,
    kfold_accuracy_grid,
    min_impostor_pairs,
    plot_roc,
    roc_curve,
    tar_at_far,
    unestimated_tar_note,
    verification_metrics,
)

# ------------------------------------------------------------------------------------------------------------
# Independent reference: insightface recognition/arcface_torch/eval/verification.py, calculate_roc(),
# transcribed loop-for-loop (minus PCA) so that any vectorisation shortcut in our code is checked against it.
# ------------------------------------------------------------------------------------------------------------


def _if_calculate_accuracy(threshold, dist, actual_issame):
    predict_issame = np.less(dist, threshold)
    tp = np.sum(np.logical_and(predict_issame, actual_issame))
    fp = np.sum(np.logical_and(predict_issame, np.logical_not(actual_issame)))
    tn = np.sum(np.logical_and(np.logical_not(predict_issame), np.logical_not(actual_issame)))
    fn = np.sum(np.logical_and(np.logical_not(predict_issame), actual_issame))
    tpr = 0 if (tp + fn == 0) else float(tp) / float(tp + fn)
    fpr = 0 if (fp + tn == 0) else float(fp) / float(fp + tn)
    acc = float(tp + tn) / dist.size
    return tpr, fpr, acc


def _if_calculate_roc(thresholds, embeddings1, embeddings2, actual_issame, nrof_folds=10):
    """Returns per-fold test accuracy, per-fold best threshold and per-fold best *train* accuracy."""
    nrof_pairs = min(len(actual_issame), embeddings1.shape[0])
    k_fold = KFold(n_splits=nrof_folds, shuffle=False)
    accuracy = np.zeros(nrof_folds)
    best_thr = np.zeros(nrof_folds)
    best_train_acc = np.zeros(nrof_folds)
    indices = np.arange(nrof_pairs)
    diff = np.subtract(embeddings1, embeddings2)
    dist = np.sum(np.square(diff), 1)
    for fold_idx, (train_set, test_set) in enumerate(k_fold.split(indices)):
        acc_train = np.zeros(len(thresholds))
        for threshold_idx, threshold in enumerate(thresholds):
            _, _, acc_train[threshold_idx] = _if_calculate_accuracy(
                threshold, dist[train_set], actual_issame[train_set]
            )
        best_threshold_index = np.argmax(acc_train)
        best_thr[fold_idx] = thresholds[best_threshold_index]
        best_train_acc[fold_idx] = acc_train[best_threshold_index]
        _, _, accuracy[fold_idx] = _if_calculate_accuracy(
            thresholds[best_threshold_index], dist[test_set], actual_issame[test_set]
        )
    return accuracy, best_thr, best_train_acc


def _synthetic_pairs(n_pairs: int, seed: int, dim: int = 64, noise: float = 3.0):
    """Unit embeddings for alternating same/different pairs with overlapping score distributions."""
    rng = np.random.default_rng(seed)
    issame = np.zeros(n_pairs, dtype=bool)
    issame[::2] = True
    rng.shuffle(issame)
    a = rng.standard_normal((n_pairs, dim))
    other = rng.standard_normal((n_pairs, dim))
    b = np.where(issame[:, None], a, other) + noise * rng.standard_normal((n_pairs, dim))
    return normalize(a), normalize(b), issame


def _scores(e1, e2):
    return np.sum(e1 * e2, axis=1)


# ------------------------------------------------------------------------------------------------------------
# k-fold accuracy
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("n_pairs", "seed"), [(600, 0), (600, 1), (605, 2), (6000, 3)])
def test_grid_matches_insightface_exactly(n_pairs, seed):
    e1, e2, issame = _synthetic_pairs(n_pairs, seed)
    ref_acc, ref_thr, _ = _if_calculate_roc(np.arange(0, 4, 0.01), e1, e2, issame)
    acc, thr = kfold_accuracy_grid(_scores(e1, e2), issame)
    assert 0.6 < ref_acc.mean() < 0.99, "synthetic data should be neither trivial nor random"
    np.testing.assert_array_equal(acc, ref_acc)
    np.testing.assert_allclose(thr, 1.0 - ref_thr / 2.0, rtol=0, atol=1e-12)


@pytest.mark.parametrize(("n_pairs", "seed"), [(600, 0), (600, 1), (605, 2), (6000, 3)])
def test_exact_search_beats_grid_on_train_and_is_close_on_test(n_pairs, seed):
    e1, e2, issame = _synthetic_pairs(n_pairs, seed)
    ref_acc, _, ref_train_acc = _if_calculate_roc(np.arange(0, 4, 0.01), e1, e2, issame)
    s = _scores(e1, e2)
    acc, thr = kfold_accuracy(s, issame)
    for k, (train, _test) in enumerate(KFold(n_splits=10, shuffle=False).split(s)):
        train_acc = np.mean((s[train] > thr[k]) == issame[train])
        assert train_acc >= ref_train_acc[k] - 1e-12
    # Not identical: the midpoint vs the grid's strict end of the best gap, and optima the 0.005 cosine grid
    # cannot reach, move a few held-out pairs. Over 30 seeds at ~90-97 % accuracy the mean differed by at
    # most 6 pairs (600 pairs) and 0.23 points (6000 pairs); the bound leaves no room for a real bug.
    assert abs(acc.mean() - ref_acc.mean()) <= max(0.003, 6.0 / n_pairs) + 1e-12


def test_exact_search_is_the_brute_force_optimum():
    e1, e2, issame = _synthetic_pairs(200, seed=5)
    s = np.round(_scores(e1, e2), 2)  # coarse rounding creates ties, which must not be split
    folds = contiguous_folds(s.size, 10)
    _, thr = kfold_accuracy(s, issame, folds)
    for k in range(10):
        tr = folds != k
        cands = np.unique(s[tr])
        cands = np.r_[cands[0] - 1, (cands[:-1] + cands[1:]) / 2, cands[-1]]
        best = max(np.mean((s[tr] > c) == issame[tr]) for c in cands)
        assert np.mean((s[tr] > thr[k]) == issame[tr]) == pytest.approx(best, abs=1e-12)


def test_explicit_folds_and_fold_count_match_default():
    e1, e2, issame = _synthetic_pairs(600, seed=7)
    s = _scores(e1, e2)
    default = kfold_accuracy_grid(s, issame)
    explicit = kfold_accuracy_grid(s, issame, np.repeat(np.arange(10), 60))
    by_count = kfold_accuracy_grid(s, issame, 10)
    for a, b in [(default, explicit), (default, by_count)]:
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_array_equal(a[1], b[1])


def test_contiguous_folds_match_sklearn_kfold():
    for n, k in [(600, 10), (605, 10), (23, 4)]:
        folds = contiguous_folds(n, k)
        for i, (_, test) in enumerate(KFold(n_splits=k, shuffle=False).split(np.arange(n))):
            np.testing.assert_array_equal(np.flatnonzero(folds == i), test)


def test_perfectly_separable_tiny_case():
    # Off-grid values: 2 - 2 * 0.9 is 0.19999999999999996, which would sit on insightface's 0.2 grid point.
    scores = np.array([0.903, 0.803, 0.1, 0.2])
    issame = np.array([True, True, False, False])
    folds = np.array([0, 1, 0, 1])  # each fold: one positive, one negative

    acc, thr = kfold_accuracy(scores, issame, folds)
    np.testing.assert_array_equal(acc, [1.0, 1.0])
    np.testing.assert_allclose(thr, [0.5015, 0.5015])  # midpoints of the other fold's (0.2, 0.803) etc.

    acc_g, thr_g = kfold_accuracy_grid(scores, issame, folds)
    # insightface's argmax takes the first grid distance above the training positive, the strict end of the
    # gap: d(0.803)=0.394 -> 0.4 (cos 0.8), d(0.903)=0.194 -> 0.2 (cos 0.9). The latter rejects the held-out
    # 0.803 positive, so the grid protocol scores 50 % on fold 1 where the midpoint scores 100 %.
    np.testing.assert_allclose(thr_g, [0.8, 0.9])
    np.testing.assert_array_equal(acc_g, [1.0, 0.5])


@pytest.mark.parametrize("pos_share", [0.7, 0.3])
@pytest.mark.parametrize("fn", [kfold_accuracy, kfold_accuracy_grid])
def test_constant_scores_give_majority_share(fn, pos_share):
    n_pos_per_fold = round(10 * pos_share)
    issame = np.tile(np.arange(10) < n_pos_per_fold, 10)
    acc, _ = fn(np.full(100, 0.3), issame)
    np.testing.assert_allclose(acc, max(pos_share, 1 - pos_share))


def test_tie_break_picks_strictest_threshold_like_argmax():
    # Accepting {0.903} or {0.903, 0.6, 0.5} is equally accurate (3 of 4 right per copy). insightface's
    # argmax over ascending distances takes the smallest distance = highest cosine; so must the exact search.
    scores = np.tile([0.903, 0.6, 0.5, 0.2], 10)
    issame = np.tile([True, False, True, False], 10)
    folds = np.repeat(np.arange(10), 4)
    _, thr = kfold_accuracy(scores, issame, folds)
    np.testing.assert_allclose(thr, 0.7515)
    _, thr_g = kfold_accuracy_grid(scores, issame, folds)
    np.testing.assert_allclose(thr_g, 0.9)  # d(0.903)=0.194: first grid point above it is 0.2


def test_invalid_inputs():
    with pytest.raises(ValueError):
        kfold_accuracy(np.zeros(5), np.zeros(4, dtype=bool), 2)
    with pytest.raises(ValueError):
        kfold_accuracy(np.array([0.1, np.nan, 0.3, 0.4]), np.array([1, 0, 1, 0]), 2)
    with pytest.raises(ValueError):
        kfold_accuracy(np.zeros(4), np.array([0, 1, 2, 1]), 2)
    with pytest.raises(ValueError):
        kfold_accuracy(np.zeros(4), np.array([0, 1, 1, 0]), np.zeros(4, dtype=int))


def test_cosine_similarity_unnormalised():
    a = np.array([[3.0, 0.0], [1.0, 1.0]])
    b = np.array([[5.0, 0.0], [-2.0, -2.0]])
    np.testing.assert_allclose(cosine_similarity(a, b), [1.0, -1.0])


# ------------------------------------------------------------------------------------------------------------
# ROC / AUC / TAR@FAR
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("drop", [False, True])
@pytest.mark.parametrize("decimals", [None, 2])
def test_roc_matches_sklearn(drop, decimals):
    e1, e2, issame = _synthetic_pairs(2000, seed=11)
    s = _scores(e1, e2)
    if decimals is not None:
        s = np.round(s, decimals)  # ties
    fpr, tpr, thr = roc_curve(s, issame, drop_intermediate=drop)
    sk_fpr, sk_tpr, sk_thr = sk_roc_curve(issame, s, drop_intermediate=drop)
    np.testing.assert_allclose(fpr, sk_fpr, rtol=0, atol=1e-15)
    np.testing.assert_allclose(tpr, sk_tpr, rtol=0, atol=1e-15)
    np.testing.assert_array_equal(thr[1:], sk_thr[1:])  # sklearn's first threshold varies by version
    assert thr[0] == np.inf
    assert auc(fpr, tpr) == pytest.approx(roc_auc_score(issame, s), abs=1e-12)


def test_tar_at_far_hand_case():
    neg = np.arange(1000) / 1000.0  # 1000 negatives, max 0.999
    pos = np.array([1.5, 1.2, 0.9985, 0.5])
    scores = np.r_[pos, neg]
    issame = np.r_[np.ones(4, bool), np.zeros(1000, bool)]
    out = tar_at_far(scores, issame, fars=(1e-3, 2e-3, 1e-4))
    # FAR <= 1e-3 allows one false accept (0.999): accepting >= 0.9985 gives 3 of 4 positives.
    assert out[1e-3] == pytest.approx(0.75)
    # Two false accepts (>= 0.998) still leave the 0.5 positive out.
    assert out[2e-3] == pytest.approx(0.75)
    # 1000 negatives cannot resolve FAR 1e-4.
    assert math.isnan(out[1e-4])


def test_tar_at_far_tie_straddling_target_is_excluded():
    # A positive tied with the two highest negatives: accepting it costs FAR 2/1000 > 1e-3.
    neg = np.r_[np.full(2, 0.95), np.linspace(0.0, 0.5, 998)]
    pos = np.array([0.99, 0.95, 0.9, 0.1])
    out = tar_at_far(np.r_[pos, neg], np.r_[np.ones(4, bool), np.zeros(1000, bool)], fars=(1e-3,))
    assert out[1e-3] == pytest.approx(0.25)


def test_tar_at_far_matches_sklearn_roc():
    e1, e2, issame = _synthetic_pairs(40000, seed=13, noise=2.0)
    s = _scores(e1, e2)
    fpr, tpr, _ = sk_roc_curve(issame, s, drop_intermediate=False)
    out = tar_at_far(s, issame, fars=(1e-3, 1e-4))
    for far in (1e-3, 1e-4):
        assert out[far] == pytest.approx(tpr[fpr <= far].max(), abs=1e-15)
    assert out[1e-3] > out[1e-4] > 0


# ------------------------------------------------------------------------------------------------------------
# Aggregate result and plot
# ------------------------------------------------------------------------------------------------------------


def test_verification_metrics_result_and_serialisation():
    e1, e2, issame = _synthetic_pairs(600, seed=17)
    s = _scores(e1, e2)
    res = verification_metrics(s, issame)
    ref_acc, _, _ = _if_calculate_roc(np.arange(0, 4, 0.01), e1, e2, issame)
    assert isinstance(res, VerificationResult)
    assert res.accuracy_mean == pytest.approx(np.mean(ref_acc), abs=1e-15)
    assert res.accuracy_std == pytest.approx(np.std(ref_acc), abs=1e-15)
    assert res.num_pairs == 600
    assert res.fold_accuracies.shape == res.fold_thresholds.shape == (10,)
    assert res.auc == pytest.approx(roc_auc_score(issame, s), abs=1e-12)
    assert math.isnan(res.tar_at_far[1e-3]) and math.isnan(res.tar_at_far[1e-4])  # only 300 negatives
    res_far = verification_metrics(s, issame, fars=(1e-2,))
    assert 0 < res_far.tar_at_far[1e-2] <= 1

    d = res.to_dict()
    text = json.dumps(d, allow_nan=False)
    back = json.loads(text)
    assert back["tar_at_far"]["0.0001"] is None
    assert back["accuracy_mean"] == pytest.approx(res.accuracy_mean)
    assert len(back["roc_fpr"]) == len(back["roc_tpr"]) == res.roc_fpr.size
    assert "roc_fpr" not in res.to_dict(include_roc=False)

    again = VerificationResult.from_dict(back)
    assert again.summary() == res.summary()
    assert again.tar_at_far.keys() == res.tar_at_far.keys() and math.isnan(again.tar_at_far[1e-4])
    np.testing.assert_array_equal(again.fold_accuracies, res.fold_accuracies)
    np.testing.assert_array_equal(again.roc_tpr, res.roc_tpr)
    assert again.auc == res.auc and again.num_pairs == res.num_pairs
    assert VerificationResult.from_dict(res.to_dict(include_roc=False)).roc_fpr.size == 0

    exact = verification_metrics(s, issame, threshold_search="exact")
    assert exact.threshold_search == "exact"
    np.testing.assert_array_equal(exact.fold_accuracies, kfold_accuracy(s, issame)[0])
    with pytest.raises(ValueError):
        verification_metrics(s, issame, threshold_search="nope")  # type: ignore[arg-type]


def test_summary_format():
    res = VerificationResult(
        accuracy_mean=0.99366,
        accuracy_std=0.0041,
        fold_accuracies=np.zeros(10),
        fold_thresholds=np.zeros(10),
        tar_at_far={},
        roc_fpr=np.zeros(2),
        roc_tpr=np.zeros(2),
        auc=0.5,
        num_pairs=6000,
    )
    assert res.summary() == "99.37 +- 0.41 %"


def test_plot_roc_writes_png(tmp_path):
    e1, e2, issame = _synthetic_pairs(3000, seed=19)
    s = _scores(e1, e2)
    res = verification_metrics(s, issame)
    fpr, tpr, _ = roc_curve(s * 0.5 + 0.1 * np.random.default_rng(0).standard_normal(s.size), issame)
    out = plot_roc({"student": res, "noisy": (fpr, tpr)}, tmp_path / "sub" / "roc.png", title="test")
    assert out.exists() and out.stat().st_size > 1000
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list(out.parent.iterdir()) == [out]  # no temp file left behind


def test_unestimated_tar_is_a_dash_with_its_reason():
    assert min_impostor_pairs(1e-3) == 1000 and min_impostor_pairs(1e-4) == 10_000 and min_impostor_pairs(0.3) == 4
    assert format_tar(0.98765) == "98.77" and format_tar(float("nan")) == "-" and format_tar(None) == "-"
    assert (
        unestimated_tar_note(1e-3, "1e-3", {"this set": 300})
        == "TAR@FAR=1e-3 needs at least 1,000 impostor pairs; this set has 300."
    )
    assert unestimated_tar_note(1e-4, "0.0001", {"lfw": 3000, "old": None, "all_same": 20_000}) == (
        "TAR@FAR=0.0001 needs at least 10,000 impostor pairs; "
        "lfw has 3,000, old has fewer, all_same has no genuine pairs."
    )

    # The count behind the reason is part of a result and survives its JSON form; old results read as unknown.
    issame = np.repeat([True, False], [700, 999])
    scores = np.r_[np.linspace(0.5, 1, 700), np.linspace(-1, 0.6, 999)]
    result = verification_metrics(scores, issame, fars=(1e-3,))
    assert math.isnan(result.tar_at_far[1e-3]) and result.num_impostor == 999  # one short of 1,000
    assert VerificationResult.from_dict(json.loads(json.dumps(result.to_dict()))).num_impostor == 999
    legacy = {key: value for key, value in result.to_dict().items() if key != "num_impostor"}
    assert VerificationResult.from_dict(legacy).num_impostor is None
    enough = verification_metrics(np.r_[scores, -1.0], np.r_[issame, False], fars=(1e-3,))
    assert enough.num_impostor == 1000 and math.isfinite(enough.tar_at_far[1e-3])
