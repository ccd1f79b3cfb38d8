"""Teacher -> cache -> students -> evaluation -> table and plot, on one harness.

``compare_methods`` is what ``facedistill demo`` and the CPU-protocol benchmark run: every student gets the same
data, teacher cache, schedule and seed, and is evaluated with the same protocol as the teacher.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from facedistill.config import Config, apply_overrides, from_dict, load_config
from facedistill.data.datasets import collate_faces, open_training_set
from facedistill.data.splits import read_identity_list
from facedistill.eval.metrics import VerificationResult, format_tar, plot_roc, unestimated_tar_note
from facedistill.eval.verify import Embedder, evaluate_pairs, load_pairs_set, student_embedder
from facedistill.teachers.cache import build_teacher_cache, class_centres
from facedistill.train.checkpoint import load_student
from facedistill.train.loop import RunSummary, model_profile, train


@dataclass
class Row:
    """One model's line of the comparison table; ``num_impostor`` counts the test set's impostor pairs (None if
    unknown), which says why a TAR@FAR could not be estimated."""

    name: str
    accuracy_mean: float
    accuracy_std: float
    tar_at_far: dict[float, float]
    params: int | None = None
    macs: int | None = None
    epochs: float | None = None
    images_per_second: float | None = None
    wall_seconds: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    num_impostor: int | None = None


TABLE_FAR = 1e-3


def markdown_table(rows: list[Row], test_name: str) -> str:
    """The comparison as a markdown table: accuracy, TAR@FAR=1e-3 (``-`` where the test set has too few impostor
    pairs to estimate it, with the reason once under the table), size, cost and training speed."""
    header = (
        f"| model | {test_name} acc. (mean +- std, %) | TAR@FAR=1e-3 | params | MACs | epochs | train img/s "
        "| wall (s) |\n|---|---|---|---|---|---|---|---|"
    )
    lines = [header]
    unestimated: list[Row] = []
    for row in rows:
        tar = format_tar(row.tar_at_far.get(TABLE_FAR))
        if tar == "-":
            unestimated.append(row)
        params = f"{row.params / 1e6:.2f} M" if row.params else "-"
        macs = f"{row.macs / 1e9:.3f} G" if row.macs else "-"
        lines.append(
            f"| {row.name} | {row.accuracy_mean * 100:.2f} +- {row.accuracy_std * 100:.2f} | {tar} | "
            f"{params} | {macs} | {row.epochs if row.epochs is not None else '-'} | "
            f"{f'{row.images_per_second:.1f}' if row.images_per_second else '-'} | "
            f"{f'{row.wall_seconds:.0f}' if row.wall_seconds else '-'} |"
        )
    if unestimated:
        # Every row is evaluated on the same test set, so one count stands for all of them.
        counts = {row.num_impostor for row in unestimated if row.num_impostor is not None}
        count = counts.pop() if len(counts) == 1 else None
        lines += ["", unestimated_tar_note(TABLE_FAR, "1e-3", {"this set": count})]
    return "\n".join(lines)


def compare_methods(
    out_dir: str | Path,
    train_data: str | Path,
    teacher: Any,
    test_pairs: str | Path,
    test_images: str | Path | None,
    methods: dict[str, dict[str, Any]],
    base_config: dict[str, Any],
    progress: bool = True,
    teacher_batch_size: int = 64,
    angle_sample_size: int = 2048,
) -> tuple[list[Row], dict[str, Any]]:
    """Cache the teacher on ``train_data``, evaluate it, train one student per entry of ``methods`` (name ->
    config overrides on top of ``base_config``) and evaluate each on ``test_pairs``.

    Re-running into the same ``out_dir`` resumes: the teacher's test result is reused when teacher and pairs
    match, and a student whose run finished with exactly the same resolved config is not trained again."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # The students train on data.exclude_identities' subset (the loop reads it from the config): the teacher cache
    # must be of the same subset, or the loop refuses it.
    exclude_list = base_config.get("data", {}).get("exclude_identities")
    dataset = open_training_set(train_data, exclude=read_identity_list(exclude_list) if exclude_list else None)
    started = time.perf_counter()
    workers = base_config.get("data", {}).get("num_workers", 2)
    cache = build_teacher_cache(
        teacher, dataset, out_dir / "teacher_cache", teacher_batch_size, workers, progress=progress
    )
    cache_seconds = time.perf_counter() - started
    centres, angle_sample, teacher_angles = _angle_sample(cache, dataset, angle_sample_size)

    test_set = load_pairs_set(test_pairs, test_images, name="test")
    # Counted from the pairs rather than read from the results: a teacher result cached by an older version lacks it.
    num_impostor = int((~test_set.pairs.issame).sum())
    teacher_result = _teacher_result(out_dir, teacher, test_set, test_pairs, test_images, progress)
    results: dict[str, VerificationResult] = {"teacher": teacher_result}
    rows = [
        Row(
            "teacher",
            teacher_result.accuracy_mean,
            teacher_result.accuracy_std,
            teacher_result.tar_at_far,
            extra={"teacher_id": teacher.teacher_id},
            num_impostor=num_impostor,
        )
    ]
    report: dict[str, Any] = {
        "teacher": {
            "id": teacher.teacher_id,
            "test": teacher_result.to_dict(),
            "cache_seconds": cache_seconds,
            "cache_images_per_second": 2 * len(dataset) / max(cache_seconds, 1e-9),
        },
        "students": {},
    }
    for name, overrides in methods.items():
        config = _student_config(base_config, overrides, out_dir / name, train_data, test_pairs, test_images)
        summary = finished_run(config) or train(config, progress=progress)
        result = results[name] = VerificationResult.from_dict(summary.tests["test"])
        profile = model_profile(config)
        rows.append(
            Row(
                name, result.accuracy_mean, result.accuracy_std, result.tar_at_far, profile["params"],
                profile["macs"], round(summary.epochs, 2), summary.images_per_second, summary.wall_seconds,
                num_impostor=num_impostor,
            )
        )  # fmt: skip
        student, _ = load_student(out_dir / name / summary.selected)
        student_angles = angles_to_centres(student_embedder(student), angle_sample, centres, progress)
        plot_angle_histograms(
            {f"{name} student": student_angles, "teacher": teacher_angles},
            out_dir / f"angles_{name}.png",
            f"Angle to the teacher's class centre on the training set: {name}",
        )
        angles = {"student_mean": float(student_angles.mean()), "teacher_mean": float(teacher_angles.mean())}
        report["students"][name] = {
            **summary.to_dict(), "model": profile, "config": config.to_dict(), "angle_to_teacher_centre_deg": angles
        }  # fmt: skip
    plot_roc(results, out_dir / "roc_all.png", "Teacher and students")
    table = markdown_table(rows, "test")
    (out_dir / "results.md").write_text(table + "\n")
    (out_dir / "results.json").write_text(json.dumps(report, indent=2, default=str))
    return rows, report


def _angle_sample(cache: Any, dataset: Any, size: int) -> tuple[torch.Tensor, Subset, np.ndarray]:
    """The teacher's mean class centres, a fixed seeded sample of the training set (the angle histograms compare
    distributions, so a sample is enough) and the teacher's own angles to its centres on it, in degrees."""
    centres, _ = class_centres(cache, dataset.labels, dataset.num_classes)
    rows = np.sort(np.random.default_rng(0).permutation(len(dataset))[:size])
    cosines = cache.typicality(centres, dataset.labels)[:, 0].clamp(-1, 1).numpy()
    return centres, Subset(dataset, rows.tolist()), np.degrees(np.arccos(cosines))[rows]


def _student_config(
    base_config: dict[str, Any],
    overrides: dict[str, Any],
    run_dir: Path,
    train_data: str | Path,
    test_pairs: str | Path,
    test_images: str | Path | None,
) -> Config:
    """One student's config: ``overrides`` on ``base_config``, trained on ``train_data`` against the comparison's
    teacher cache (beside ``run_dir``), tested on the comparison's pairs."""
    data = _merge(json.loads(json.dumps(base_config)), overrides)
    data.setdefault("run", {})["output_dir"] = str(run_dir)
    data.setdefault("data", {})["train"] = str(train_data)
    data.setdefault("teacher", {})["cache"] = str(run_dir.parent / "teacher_cache")
    test = {"name": "test", "pairs": str(test_pairs), **({"images": str(test_images)} if test_images else {})}
    data.setdefault("eval", {})["tests"] = [test]
    return from_dict(Config, data)


def _teacher_result(
    out_dir: Path, teacher: Any, test_set: Any, test_pairs: str | Path, test_images: str | Path | None, progress: bool
) -> VerificationResult:
    key = {"teacher": teacher.teacher_id, "pairs": str(test_pairs), "images": str(test_images)}
    saved = out_dir / "teacher_test.json"
    if saved.exists():
        stored = json.loads(saved.read_text())
        if stored.get("key") == key:
            return VerificationResult.from_dict(stored["result"])
    result, _ = evaluate_pairs(teacher.embed, test_set, progress=progress)
    saved.write_text(json.dumps({"key": key, "result": result.to_dict()}, default=str))
    return result


def finished_run(config: Config, test_name: str | None = "test") -> RunSummary | None:
    """The summary of a finished run in ``config.run.output_dir`` trained with this exact config (and, unless
    ``test_name`` is None, evaluated on that test set), else None."""
    run_dir = Path(config.run.output_dir)
    results, saved_config = run_dir / "results.json", run_dir / "config.yaml"
    if not (results.exists() and saved_config.exists()):
        return None
    if load_config(saved_config).to_dict() != config.to_dict():
        return None
    stored = json.loads(results.read_text())
    if test_name is not None and test_name not in stored.get("tests", {}):
        return None
    fields = {name: stored[name] for name in RunSummary.__dataclass_fields__ if name in stored}
    return RunSummary(**{**fields, "run_dir": run_dir})


def angles_to_centres(
    embedder: Embedder, dataset: Dataset, centres: torch.Tensor, progress: bool = True, batch_size: int = 256
) -> np.ndarray:
    """Angle in degrees between each training image's embedding and the (teacher) centre of its class."""
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=collate_faces)
    angles = []
    for batch in tqdm(loader, desc="angles to centres", unit="batch", disable=not progress, leave=False):
        cos = (F.normalize(embedder(batch.images), dim=1) * centres[batch.labels]).sum(dim=1)
        angles.append(torch.rad2deg(torch.arccos(cos.clamp(-1.0, 1.0))))
    return torch.cat(angles).numpy()


def plot_angle_histograms(angles: dict[str, np.ndarray], out_png: Path, title: str) -> None:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6.4, 4.0))
    axes = figure.subplots()
    bins = np.linspace(0, 120, 61)
    for label, values in angles.items():
        axes.hist(values, bins=bins, alpha=0.55, label=f"{label} (mean {values.mean():.1f} deg)")
    axes.set_xlabel("angle to the class centre (degrees)")
    axes.set_ylabel("training images")
    axes.set_title(title, fontsize=9)
    axes.legend()
    figure.tight_layout()
    figure.savefig(out_png, dpi=120)


def _merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict) and key != "method":
            _merge(base[key], value)
        else:
            base[key] = value
    return base


__all__ = ["Row", "apply_overrides", "compare_methods", "finished_run", "markdown_table"]
