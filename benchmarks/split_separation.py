"""Which validation split tells two methods apart: the same finished runs read on several pair sets (issue 42).

The CPU protocol's validation split (``recipes/splits/celeba299``: 30 identities, 600 pairs) could not separate
MarginDistillation from ArcFace. A bigger split held out of the same training set (49 identities, 2000 pairs, which
contain the 30) leaves 250 training identities. Runs trained without all 49 identities can be read on both pair
sets; for each set this prints every run's accuracy (mean ± std over its folds) and AUC, and for each run against
the first: the paired per-fold accuracy difference, its t statistic (mean / (std / sqrt(folds))), and the AUC
difference with its standard error from a paired bootstrap over pairs (same and different pairs resampled apart).
The set with the larger |t| and |AUC difference| / SE separates the methods better at the same models. Beside the
table, a picture: each run's AUC difference to the first with its 95 % interval (1.96 SE), one panel per pair set.
``--from-results FILE`` redraws the table and the picture from a saved report without reading a model.

    python benchmarks/split_separation.py \\
        --runs bench_out/split49/runs/arcface_shift4_8ep_seed0 bench_out/split49/runs/md_centred_kd_shift4_8ep_seed0 \\
        --pairs recipes/splits/celeba299/val_pairs.tsv recipes/splits/celeba299_49/val_pairs.tsv \\
        --images ../shared/data/celeba299 --results benchmarks/results/split_separation_2026-12-07.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from facedistill.eval.metrics import auc, roc_curve
from facedistill.eval.verify import evaluate_pairs, load_pairs_set, student_embedder
from facedistill.train.checkpoint import load_student

sys.path.insert(0, str(Path(__file__).resolve().parent))
import validation_study as study  # noqa: E402  (the studies' shared output)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="+", type=Path, help="finished run directories (last.pt)")
    parser.add_argument("--pairs", nargs="+", type=Path, help="pair files (left, right, label, fold)")
    parser.add_argument("--images", type=Path, help="the folder the pairs' paths are relative to")
    parser.add_argument("--bootstrap", type=int, default=2000, help="resamples of the pairs for the AUC's SE")
    parser.add_argument("--results", type=Path, help="JSON (and a .md and .png beside it) of the table")
    parser.add_argument("--from-results", type=Path, help="redraw the table and plot of this saved report")
    args = parser.parse_args(argv)
    if args.from_results is None and not (args.runs and args.pairs and args.images):
        parser.error("give --runs, --pairs and --images (or --from-results FILE to redraw a saved report)")
    return args


def pairs_auc(scores: np.ndarray, same: np.ndarray) -> float:
    """The evaluation path's AUC (``eval.metrics``: ROC, then the trapezoidal rule) of one set of scored pairs."""
    fpr, tpr, _ = roc_curve(scores, same)
    return auc(fpr, tpr)


def bootstrap_auc_difference(
    scores: np.ndarray, baseline: np.ndarray, same: np.ndarray, resamples: int, seed: int = 0
) -> float:
    """Standard error of AUC(scores) - AUC(baseline), both models scored on the same resampled pairs."""
    rng = np.random.default_rng(seed)
    positive, negative = np.flatnonzero(same), np.flatnonzero(~same)
    differences = np.empty(resamples)
    for index in range(resamples):
        rows = np.concatenate([rng.choice(positive, len(positive)), rng.choice(negative, len(negative))])
        differences[index] = pairs_auc(scores[rows], same[rows]) - pairs_auc(baseline[rows], same[rows])
    return float(differences.std(ddof=1))


def run_labels(runs: list[Path]) -> list[str]:
    """Each run's name in the report: its directory's name, or ``STUDY/NAME`` (the study folder above ``runs/``)
    where two studies hold a run of the same name (the same row trained on two training sets)."""
    names = [run.name for run in runs]
    labels = [run.name if names.count(run.name) == 1 else f"{run.parent.parent.name}/{run.name}" for run in runs]
    if len(set(labels)) != len(labels):
        raise SystemExit(f"runs {[str(run) for run in runs]}: two are the same run; give each once")
    return labels


def read_set(runs: list[Path], pairs_path: Path, images: Path, resamples: int) -> dict[str, Any]:
    pairs_set = load_pairs_set(pairs_path, images, name=pairs_path.parent.name)
    same = np.asarray(pairs_set.pairs.issame, dtype=bool)
    per_run: dict[str, Any] = {}
    scores: dict[str, np.ndarray] = {}
    labels = run_labels(runs)
    for run, label in zip(runs, labels, strict=True):
        student, _ = load_student(run / "last.pt")
        result, scores[label] = evaluate_pairs(student_embedder(student), pairs_set, num_workers=1, progress=False)
        per_run[label] = {
            "fold_accuracies": (np.asarray(result.fold_accuracies) * 100).tolist(),
            "auc": result.auc * 100,
        }
    base = labels[0]
    for label in labels[1:]:
        delta = np.asarray(per_run[label]["fold_accuracies"]) - np.asarray(per_run[base]["fold_accuracies"])
        spread = delta.std(ddof=1)
        per_run[label]["paired"] = {
            "against": base,
            "mean_pp": float(delta.mean()),
            "std_pp": float(spread),
            "t": float(delta.mean() / (spread / np.sqrt(len(delta)))) if spread > 0 else float("inf"),
            "auc_difference_pp": per_run[label]["auc"] - per_run[base]["auc"],
            "auc_difference_se_pp": 100 * bootstrap_auc_difference(scores[label], scores[base], same, resamples),
        }
    return {"pairs": len(same), "folds": len(per_run[base]["fold_accuracies"]), "runs": per_run}


def table(report: dict[str, Any]) -> list[str]:
    lines = [
        f"host {report['machine']['host']}, {report['machine']['cpus']} CPUs, torch {report['machine']['torch']}",
        "",
        "| pairs file | pairs x folds | run | acc. % (mean ± fold std) | AUC % | paired acc. diff. (pp, t) | "
        "AUC diff. ± bootstrap SE (pp, ratio) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, split in report["splits"].items():
        for run, entry in split["runs"].items():
            folds = np.asarray(entry["fold_accuracies"])
            paired, auc_cell = "–", "–"
            if "paired" in entry:
                p = entry["paired"]
                paired = f"{p['mean_pp']:+.2f} ± {p['std_pp']:.2f} (t = {p['t']:+.2f})"
                ratio = p["auc_difference_pp"] / p["auc_difference_se_pp"]
                auc_cell = f"{p['auc_difference_pp']:+.2f} ± {p['auc_difference_se_pp']:.2f} ({ratio:+.2f})"
            cells = [
                name, f"{split['pairs']} / {split['folds']}", run, f"{folds.mean():.2f} ± {folds.std(ddof=1):.2f}",
                f"{entry['auc']:.2f}", paired, auc_cell,
            ]  # fmt: skip
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def plot(report: dict[str, Any], path: Path) -> None:
    """AUC difference to the first run, with its 95 % bootstrap interval, per run and pair set."""
    from matplotlib.figure import Figure

    splits = report["splits"]
    base, *runs = next(iter(splits.values()))["runs"]
    figure = Figure(figsize=(4.2 * len(splits) + 1.5, 0.35 * len(runs) + 1.6))
    axes = figure.subplots(1, len(splits), sharey=True, squeeze=False)[0]
    for panel, (name, split) in zip(axes, splits.items(), strict=True):
        paired = [split["runs"][run]["paired"] for run in runs]
        differences = [p["auc_difference_pp"] for p in paired]
        intervals = [1.96 * p["auc_difference_se_pp"] for p in paired]
        colors = [
            "C2" if d - i > 0 else "C3" if d + i < 0 else "C7" for d, i in zip(differences, intervals, strict=True)
        ]
        panel.barh(range(len(runs)), differences, xerr=intervals, color=colors, alpha=0.8, capsize=3)
        panel.axvline(0.0, color="black", linewidth=0.8)
        panel.set_title(f"{Path(name).parent.name}: {split['pairs']} pairs", fontsize=9)
        panel.set_xlabel("AUC difference (pp) ± 1.96 bootstrap SE")
        panel.grid(alpha=0.3, axis="x")
    axes[0].set_yticks(range(len(runs)), [run.removesuffix("_seed0") for run in runs], fontsize=8)
    title = f"validation AUC against {base.removesuffix('_seed0')} (green/red: interval clear of 0)"
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    results = args.results or args.from_results
    if args.from_results is not None:
        report = json.loads(args.from_results.read_text())
    else:
        for run in args.runs:
            if not (run / "last.pt").exists():
                raise SystemExit(f"{run}: no last.pt; give finished run directories")
        report = {
            "machine": {"host": platform.node(), "cpus": torch.get_num_threads(), "torch": torch.__version__},
            "splits": {str(path): read_set(args.runs, path, args.images, args.bootstrap) for path in args.pairs},
        }
    study.publish(report, table(report), results)
    if results is not None:
        plot(report, results.with_suffix(".png"))
    return report


if __name__ == "__main__":
    main()
