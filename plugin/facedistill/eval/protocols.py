"""Scoring of the evaluation protocols beyond plain pairs: CFP, IJB-B/IJB-C 1:1 and MegaFace-style rank-1.

Every protocol ends in :mod:`facedistill.eval.metrics` (ROC, TAR@FAR, k-fold accuracy); this module only turns a
protocol's images into the scores those metrics need.

IJB 1:1 follows insightface's ``recognition/_evaluation_/ijb/ijb_11.py`` (and ``arcface_torch/eval_ijbc.py``):

* image feature = embedding(image) + embedding(mirror), *not* normalised: insightface's default
  ``use_norm_score=True`` ("N1") keeps the norm, which acts as a quality weight in the averages below;
* optionally times the detector score of ``name_5pts_score.txt`` (its default ``use_detector_score=True``, "D1");
* template feature = sum over the template's media of the mean image feature within each media, L2-normalised
  (:func:`template_features`, a vectorised ``image2template_feature``);
* score = cosine between template features; TAR at FAR 1e-6 .. 1e-1 from the ROC of all pairs.

How TAR@FAR is read off the ROC differs: insightface reports the TPR of the ROC point whose FPR is *nearest* each
anchor (``min(zip(abs(fpr - x), range(len(fpr))))`` over ``sklearn.metrics.roc_curve`` flipped, so ties go to the
higher TPR), which may lie above the anchor. :func:`facedistill.eval.metrics.tar_at_far` takes the best TPR with
FPR *at most* the anchor, so it is never higher than insightface's number and differs only when the nearest point
is past the anchor. The gap is largest at 1e-6, where IJB-B has 8 and IJB-C 15 impostor pairs to spare.
:func:`ijb_verification` reports both (``tar_at_far`` and ``tar_at_far_nearest``); quote the second to compare
with papers.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from facedistill.data.protocols import IJBProtocol, MegaFaceProtocol, read_cfp, read_ijb, read_megaface
from facedistill.data.verification import PairList
from facedistill.eval.metrics import (
    VerificationResult,
    _json_float,
    auc,
    roc_curve,
    tar_at_far,
    verification_metrics,
)
from facedistill.eval.verify import Embedder, PairsSet, embed_keys, evaluate_pairs, load_pairs_set

__all__ = [
    "IJB_FARS",
    "PROTOCOLS",
    "cfp_verification",
    "evaluate_protocol",
    "ijb_verification",
    "load_protocol",
    "megaface_rank1",
    "megaface_trials",
    "tar_at_far_nearest",
    "template_features",
    "template_pair_scores",
    "write_result",
]

PROTOCOLS = ("lfw", "pairs", "cfp-fp", "cfp-ff", "ijbb", "ijbc", "megaface")
IJB_FARS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)

# Elements per temporary matrix in the chunked loops: 2**24 float64 = 128 MiB, small next to the features.
_CHUNK_ELEMENTS = 1 << 24


# ------------------------------------------------------------------------------------------------------------
# IJB 1:1
# ------------------------------------------------------------------------------------------------------------


def template_features(
    image_features: np.ndarray,
    templates: np.ndarray,
    medias: np.ndarray,
    detector_scores: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Aggregate image features ``[N, d]`` into L2-normalised template features, as insightface's
    ``image2template_feature``.

    Within each template the images of one media (video or photo id) are averaged, the media averages are summed
    and the sum is L2-normalised (a zero sum stays zero, as ``sklearn.preprocessing.normalize`` leaves it). A
    media id shared by two templates is a separate media in each. With ``detector_scores`` every image feature is
    first multiplied by its score.

    Returns:
        ``(template_ids, features)``: the sorted unique template ids ``[T]`` and float64 features ``[T, d]``.
    """
    feats = np.asarray(image_features)
    t = np.asarray(templates).reshape(-1)
    m = np.asarray(medias).reshape(-1)
    if feats.ndim != 2 or not (feats.shape[0] == t.shape[0] == m.shape[0]):
        raise ValueError(
            f"expected image_features [N, d] with N templates and medias, got {feats.shape}, {t.shape}, {m.shape}"
        )
    if feats.shape[0] == 0:
        raise ValueError("no images")
    template_ids, template_of = np.unique(t, return_inverse=True)
    template_of = template_of.reshape(-1)
    order = np.lexsort((m, template_of))
    # Gathered in the features' own float type (IJB-C: 469k x 512 float32 is ~1 GB a copy); sums accumulate in
    # float64 through reduceat's dtype instead of a float64 copy.
    x = feats[order].astype(np.result_type(feats.dtype, np.float32), copy=False)
    if detector_scores is not None:
        s = np.asarray(detector_scores).reshape(-1)
        if s.shape[0] != feats.shape[0]:
            raise ValueError(f"{s.shape[0]} detector scores for {feats.shape[0]} images")
        x *= s[order, None].astype(x.dtype)
    t_sorted, m_sorted = template_of[order], m[order]
    media_start = np.flatnonzero(np.r_[True, (t_sorted[1:] != t_sorted[:-1]) | (m_sorted[1:] != m_sorted[:-1])])
    media_size = np.diff(np.r_[media_start, x.shape[0]])
    media_mean = np.add.reduceat(x, media_start, axis=0, dtype=np.float64) / media_size[:, None]
    media_template = t_sorted[media_start]
    template_start = np.flatnonzero(np.r_[True, media_template[1:] != media_template[:-1]])
    summed = np.add.reduceat(media_mean, template_start, axis=0)
    norm = np.linalg.norm(summed, axis=1, keepdims=True)
    return template_ids, np.divide(summed, norm, out=np.zeros_like(summed), where=norm > 0)


def _rows_of(template_ids: np.ndarray, wanted: np.ndarray, what: str) -> np.ndarray:
    order = np.argsort(template_ids, kind="stable")
    sorted_ids = template_ids[order]
    pos = np.clip(np.searchsorted(sorted_ids, wanted), 0, sorted_ids.size - 1)
    found = sorted_ids[pos] == wanted
    if not found.all():
        first = int(np.flatnonzero(~found)[0])
        raise ValueError(
            f"{what}[{first}] = {int(wanted[first])} is not among the template ids "
            f"({int((~found).sum())} pair entries without a template)"
        )
    return order[pos]


def template_pair_scores(
    template_ids: np.ndarray,
    features: np.ndarray,
    pairs_t1: np.ndarray,
    pairs_t2: np.ndarray,
) -> np.ndarray:
    """Cosine score of every template pair ``[P]`` (features as from :func:`template_features`, unit rows).

    Gathering both sides of 15.6 M IJB-C pairs at once would take 64 GB at d = 512, so pairs go in chunks.
    """
    ids = np.asarray(template_ids).reshape(-1)
    f = np.asarray(features)
    if f.ndim != 2 or f.shape[0] != ids.shape[0]:
        raise ValueError(f"features {f.shape} do not match {ids.shape[0]} template ids")
    if np.unique(ids).size != ids.size:
        raise ValueError("template ids must be unique")
    p1 = np.asarray(pairs_t1).reshape(-1)
    p2 = np.asarray(pairs_t2).reshape(-1)
    if p1.shape != p2.shape:
        raise ValueError(f"pairs_t1 and pairs_t2 differ in length: {p1.shape[0]} vs {p2.shape[0]}")
    r1 = _rows_of(ids, p1, "pairs_t1")
    r2 = _rows_of(ids, p2, "pairs_t2")
    scores = np.empty(p1.shape[0], dtype=np.float64)
    step = max(1, _CHUNK_ELEMENTS // max(1, f.shape[1]))
    for start in range(0, p1.shape[0], step):
        a = f[r1[start : start + step]]
        b = f[r2[start : start + step]]
        scores[start : start + step] = np.einsum("nd,nd->n", a, b)
    return scores


def tar_at_far_nearest(fpr: np.ndarray, tpr: np.ndarray, fars: Sequence[float] = IJB_FARS) -> dict[float, float]:
    """insightface's IJB table: the TPR of the ROC point whose FPR is nearest each target.

    Ties in distance go to the higher-index point of the ascending ROC (``min`` over ``(distance, index)`` of
    the flipped curve), i.e. the higher TPR. Use with the curve of ``roc_curve(..., drop_intermediate=True)``,
    whose points are those of ``sklearn.metrics.roc_curve``'s default, as in insightface.
    """
    x = np.asarray(fpr, dtype=np.float64)
    y = np.asarray(tpr, dtype=np.float64)
    out: dict[float, float] = {}
    for far in fars:
        if np.isnan(x).all():
            out[float(far)] = float("nan")
            continue
        distance = np.abs(x - float(far))
        out[float(far)] = float(y[np.flatnonzero(distance == np.nanmin(distance))[-1]])
    return out


def _far_dict(values: dict[float, float]) -> dict[str, float | None]:
    # Same key style as VerificationResult.to_dict: repr keeps "1e-06" exact and round-trippable.
    return {repr(float(k)): _json_float(v) for k, v in values.items()}


def ijb_verification(
    template_ids: np.ndarray,
    template_features: np.ndarray,
    pairs_t1: np.ndarray,
    pairs_t2: np.ndarray,
    labels: np.ndarray,
    fars: Sequence[float] = IJB_FARS,
) -> dict[str, Any]:
    """IJB 1:1 verification numbers as a JSON-safe dict.

    Keys: ``tar_at_far`` (best TAR with FAR <= target, :func:`~facedistill.eval.metrics.tar_at_far`; ``None``
    where fewer than ``1 / far`` impostor pairs exist), ``tar_at_far_nearest`` (insightface's nearest-point
    reading, see the module doc), ``auc``, ``roc_fpr``/``roc_tpr`` (collinear points dropped), ``num_pairs``,
    ``num_genuine``, ``num_impostor``, ``num_templates``.
    """
    y = np.asarray(labels).reshape(-1)
    scores = template_pair_scores(template_ids, template_features, pairs_t1, pairs_t2)
    fpr, tpr, _ = roc_curve(scores, y, drop_intermediate=True)
    y = y.astype(bool)
    has_both = bool(y.any() and (~y).any())
    return {
        "tar_at_far": _far_dict(tar_at_far(scores, y, fars)),
        "tar_at_far_nearest": _far_dict(tar_at_far_nearest(fpr, tpr, fars)),
        "auc": _json_float(auc(fpr, tpr)) if has_both else None,
        "num_pairs": int(y.size),
        "num_genuine": int(y.sum()),
        "num_impostor": int((~y).sum()),
        "num_templates": int(np.asarray(template_ids).size),
        "roc_fpr": [_json_float(v) for v in fpr.tolist()],
        "roc_tpr": [_json_float(v) for v in tpr.tolist()],
    }


# ------------------------------------------------------------------------------------------------------------
# MegaFace-style identification
# ------------------------------------------------------------------------------------------------------------


def _unit_rows(x: np.ndarray) -> np.ndarray:
    norm = np.sqrt(np.einsum("nd,nd->n", x, x))
    return x / np.maximum(norm, 1e-12)[:, None]


def megaface_trials(
    probe_features: np.ndarray,
    probe_ids: np.ndarray,
    distractor_features: np.ndarray,
    chunk_size: int | None = None,
) -> tuple[int, int]:
    """``(successes, trials)`` of the MegaFace rank-1 protocol; see :func:`megaface_rank1`.

    Image ``g`` of an identity as the gallery item and another image ``p`` of it as the probe succeed iff
    ``cos(p, g) > max_d cos(p, d)`` over all distractors ``d`` (a tie counts as a miss). The distractor maximum
    depends on the probe only, so it is computed once per image, ``chunk_size`` probes at a time (default: so
    that one chunk x distractors matrix holds about 2**24 values); the distractor array is never copied.
    """
    probes = np.asarray(probe_features)
    ids = np.asarray(probe_ids).reshape(-1)
    distractors = np.asarray(distractor_features)
    if probes.ndim != 2 or probes.shape[0] != ids.shape[0]:
        raise ValueError(f"expected probe_features [N, d] with N probe ids, got {probes.shape} and {ids.shape}")
    if distractors.ndim != 2 or distractors.shape[1] != probes.shape[1]:
        raise ValueError(f"distractor_features {distractors.shape} do not match probe dimension {probes.shape[1]}")
    # One dtype for both sides, and the distractors' own when they are float32: upcasting a million
    # distractors to float64 would copy gigabytes.
    dtype = np.result_type(distractors.dtype, np.float32)
    units = _unit_rows(probes.astype(dtype))

    _, group, counts = np.unique(ids, return_inverse=True, return_counts=True)
    group = group.reshape(-1)
    eligible = np.flatnonzero(counts[group] >= 2)
    if eligible.size == 0:
        raise ValueError("no probe identity has two or more images, so there is no rank-1 trial")

    best_distractor = np.full(probes.shape[0], -np.inf, dtype=dtype)
    if distractors.shape[0]:
        inv_norm = 1.0 / np.maximum(np.sqrt(np.einsum("nd,nd->n", distractors, distractors)), 1e-12).astype(dtype)
        step = chunk_size or max(1, _CHUNK_ELEMENTS // distractors.shape[0])
        for start in range(0, eligible.size, step):
            rows = eligible[start : start + step]
            sims = (units[rows] @ distractors.T.astype(dtype, copy=False)) * inv_norm
            best_distractor[rows] = sims.max(axis=1)

    successes = trials = 0
    order = eligible[np.argsort(group[eligible], kind="stable")]
    starts = np.flatnonzero(np.r_[True, group[order][1:] != group[order][:-1]])
    for members in np.split(order, starts[1:]):
        own = units[members] @ units[members].T  # own[p, g]: probe p against gallery item g
        hit = own > best_distractor[members][:, None]
        np.fill_diagonal(hit, False)
        successes += int(hit.sum())
        trials += members.size * (members.size - 1)
    return successes, trials


def megaface_rank1(
    probe_features: np.ndarray,
    probe_ids: np.ndarray,
    distractor_features: np.ndarray,
    chunk_size: int | None = None,
) -> float:
    """MegaFace-style rank-1 identification rate.

    For every identity with at least two probe images and every image ``g`` of it as the gallery item, the
    gallery is ``{g}`` plus all distractors and the probes are the identity's other images; the rate is the
    share of (probe, gallery item) trials whose nearest gallery item by cosine is ``g``. Identities with a
    single image contribute no trial.
    """
    successes, trials = megaface_trials(probe_features, probe_ids, distractor_features, chunk_size)
    return successes / trials


# ------------------------------------------------------------------------------------------------------------
# Embedding and the protocol entry points
# ------------------------------------------------------------------------------------------------------------


def _file_reader(name: str) -> PairsSet:
    # PairsSet without packed images reads its keys as file paths; the protocol images need nothing more.
    return PairsSet(name, PairList([], [], np.zeros(0, dtype=bool), np.zeros(0, dtype=np.int64)))


def _embed_raw(
    embedder: Embedder,
    reader: PairsSet,
    keys: Sequence[str],
    flip: bool,
    batch_size: int,
    num_workers: int,
    progress: bool,
) -> np.ndarray:
    """Flip-summed features *with* their norm, through :func:`embed_keys` (which returns unit vectors).

    A constant 1 appended to each view's embedding sums to ``k`` (the number of views) and is scaled by the same
    ``1 / norm`` as the features, so ``unit[:, :d] * k / unit[:, d]`` is the un-normalised sum exactly.
    """

    def with_marker(images: torch.Tensor) -> torch.Tensor:
        features = embedder(images).float()
        return torch.cat([features, features.new_ones(features.shape[0], 1)], dim=1)

    unit = embed_keys(with_marker, reader, keys, flip, batch_size, num_workers, progress)
    views = np.float32(2.0 if flip else 1.0)
    return unit[:, :-1] * (views / unit[:, -1:])


def cfp_verification(
    embedder: Embedder,
    root: str | Path,
    split: str = "FP",
    *,
    aligned_dir: str | Path | None = None,
    flip: bool = True,
    batch_size: int = 256,
    num_workers: int = 2,
    progress: bool = True,
) -> tuple[VerificationResult, np.ndarray]:
    """CFP-FP / CFP-FF: the standard 10-fold verification with the protocol's own splits as folds."""
    pairs_set = PairsSet(f"cfp_{split.lower()}", read_cfp(root, split, aligned_dir=aligned_dir))
    return evaluate_pairs(embedder, pairs_set, flip, batch_size, num_workers, progress)


def load_protocol(
    protocol: str,
    root: str | Path | None = None,
    *,
    pairs: str | Path | None = None,
    images: str | Path | None = None,
    aligned_dir: str | Path | None = None,
) -> PairsSet | IJBProtocol | MegaFaceProtocol:
    """The metadata of a named protocol (one of :data:`PROTOCOLS`).

    * ``lfw``: ``pairs`` (default ``root/pairs.txt``) with images under ``aligned_dir``, ``images`` or ``root``;
    * ``pairs``: ``pairs`` as LFW ``pairs.txt``, ``.bin`` pack or TSV (``images`` as their image root);
    * ``cfp-fp`` / ``cfp-ff``: CFP under ``root``; ``ijbb`` / ``ijbc``: IJB under ``root``; ``megaface``:
      ``root/probes.tsv`` and ``root/distractors.txt``. These take ``aligned_dir`` for the aligned images.
    """
    protocol = protocol.lower()
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}")
    if protocol == "pairs":
        if pairs is None:
            raise ValueError("protocol 'pairs' needs a pairs file (LFW pairs.txt, .bin pack or TSV)")
        return load_pairs_set(pairs, images)
    if protocol == "lfw":
        image_root = aligned_dir or images or root
        if image_root is None or (pairs is None and root is None):
            raise ValueError("protocol 'lfw' needs the LFW root folder (or --pairs and --images)")
        return load_pairs_set(Path(pairs) if pairs is not None else Path(root) / "pairs.txt", image_root, "lfw")
    if root is None:
        raise ValueError(f"protocol {protocol!r} needs the dataset root folder")
    if protocol in ("cfp-fp", "cfp-ff"):
        split = protocol[-2:].upper()
        return PairsSet(protocol.replace("-", "_"), read_cfp(root, split, aligned_dir=aligned_dir))
    if protocol in ("ijbb", "ijbc"):
        return read_ijb(root, protocol.upper(), aligned_dir=aligned_dir)
    return read_megaface(root, aligned_dir=aligned_dir)


def evaluate_protocol(
    embedder: Embedder,
    protocol: PairsSet | IJBProtocol | MegaFaceProtocol,
    *,
    flip: bool = True,
    batch_size: int = 256,
    num_workers: int = 2,
    progress: bool = True,
    keep_feature_norm: bool = True,
    use_detector_scores: bool = True,
    fars: Sequence[float] | None = None,
) -> dict[str, Any]:
    """Embed a protocol's images with ``embedder`` and score them; returns a JSON-safe dict.

    Every result has ``protocol`` and ``kind``:

    * ``"verification"`` (a :class:`PairsSet`: LFW, TSV, ``.bin``, CFP): :meth:`VerificationResult.to_dict`;
      ``fars`` defaults to ``(1e-3, 1e-4)``;
    * ``"ijb"``: :func:`ijb_verification` plus ``num_images`` and the settings. ``keep_feature_norm`` and
      ``use_detector_scores`` (ignored without scores) are insightface's ``use_norm_score`` and
      ``use_detector_score``; both default on, as in its published protocol. ``fars`` defaults to 1e-6 .. 1e-1;
    * ``"identification"`` (MegaFace): ``rank1``, ``num_trials``, ``num_identities`` (with >= 2 images),
      ``num_probe_images``, ``num_distractors``.
    """
    kw = {"flip": flip, "batch_size": batch_size, "num_workers": num_workers, "progress": progress}
    if isinstance(protocol, PairsSet):
        result, scores = evaluate_pairs(embedder, protocol, **kw)
        if fars is not None:
            pairs = protocol.pairs
            result = verification_metrics(scores, pairs.issame, pairs.folds, fars=fars)
        return {"protocol": protocol.name, "kind": "verification", **result.to_dict()}
    if isinstance(protocol, IJBProtocol):
        reader = _file_reader(protocol.name)
        if keep_feature_norm:
            features = _embed_raw(embedder, reader, protocol.images, **kw)
        else:
            features = embed_keys(embedder, reader, protocol.images, **kw)
        scores = protocol.scores if use_detector_scores else None
        ids, feats = template_features(features, protocol.templates, protocol.medias, scores)
        out = {"protocol": protocol.name.lower(), "kind": "ijb", "num_images": len(protocol.images)}
        out.update(
            ijb_verification(
                ids, feats, protocol.pairs_t1, protocol.pairs_t2, protocol.labels, IJB_FARS if fars is None else fars
            )
        )
        out["keep_feature_norm"] = keep_feature_norm
        out["detector_scores"] = scores is not None
        return out
    if isinstance(protocol, MegaFaceProtocol):
        # Distractors may repeat probe files; embed every distinct file once.
        keys = list(dict.fromkeys(protocol.probe_images + protocol.distractor_images))
        features = embed_keys(embedder, _file_reader("megaface"), keys, **kw)
        n_probe = len(protocol.probe_images)
        if len(keys) == n_probe + len(protocol.distractor_images):
            # No file repeated: slice views, not a second copy of a million distractor features.
            probe, distractor = features[:n_probe], features[n_probe:]
        else:
            position = {key: i for i, key in enumerate(keys)}
            probe = features[[position[k] for k in protocol.probe_images]]
            distractor = features[[position[k] for k in protocol.distractor_images]]
        successes, trials = megaface_trials(probe, protocol.probe_ids, distractor)
        _, counts = np.unique(protocol.probe_ids, return_counts=True)
        return {
            "protocol": "megaface",
            "kind": "identification",
            "rank1": successes / trials,
            "num_trials": trials,
            "num_identities": int((counts >= 2).sum()),
            "num_probe_images": len(protocol.probe_images),
            "num_distractors": len(protocol.distractor_images),
        }
    raise TypeError(f"cannot evaluate a {type(protocol).__name__}; load it with load_protocol()")


def write_result(result: dict[str, Any], path: str | Path) -> Path:
    """Write an :func:`evaluate_protocol` result as indented JSON (strict: NaN would be invalid JSON)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, allow_nan=False))
    return path
