"""The CPU protocol's learning curve (issue 19): ArcFace and facedistill's best recipe at several budgets of 2-core
training, each budget a run of its own with its own full cosine schedule, every choice made on the validation split.

Every run is a row of ``benchmarks/validation_study.py`` (its recipe, the 269 training identities of
``recipes/splits/celeba299``, the SFace teacher) trained for BUDGET epochs, validated after every epoch on the 600
held-out pairs (accuracy and AUC, in the run's ``val.csv``), checkpointed every half epoch, and read on LFW once,
after it has finished. Nothing reads LFW during a run and nothing is chosen on it.

    # the curve: both methods at 4, 8, 16 and 36 epochs (36 epochs: about 60 minutes at 62 img/s)
    python benchmarks/learning_curve.py --out bench_out/curve --rows arcface md_centred_kd \\
        --budgets 4 8 16 36 --results benchmarks/results/learning_curve_2026-12-04.json --resume
    # an ablation at one budget: compare it on the table's validation columns only
    python benchmarks/learning_curve.py --out bench_out/curve --rows md_centred_kd_w2 --budgets 16 \\
        --results benchmarks/results/learning_curve_ablations_2026-12-04.json

The distillation zoo (issue 42) runs through the same script: tuning and screening rows are trained and
validated with ``--val-only`` (LFW is not read), and only the final rows read LFW, once, and are exported with
``--export DIR`` (``facedistill export`` of the last checkpoint, DIR/ROW_BUDGETep_seedSEED.onnx)::

    # tuning: every zoo row, 4 epochs, validation only
    python benchmarks/learning_curve.py --out bench_out/zoo --rows zoo --budgets 4 --val-only \\
        --results benchmarks/results/zoo_tuning_2026-12-07.json --resume
    # screening on celeba299_49: each peer at the value the tuning rule picks (validation_study.choose_tuned)
    python benchmarks/learning_curve.py --out bench_out/split49 --rows arcface_shift4 md_centred_kd_shift4 \\
        md_official_shift4 zoo_chosen --tuned benchmarks/results/zoo_tuning_2026-12-07.json --budgets 8 \\
        --val-only --exclude recipes/splits/celeba299_49/val_identities.txt \\
        --val-pairs recipes/splits/celeba299_49/val_pairs.tsv \\
        --results benchmarks/results/zoo_screen_split49_8ep_2026-12-07.json --resume
    # finals: the peers the screen sends on (validation_study.choose_finalists), MD both ways and ArcFace, two
    # seeds, LFW read once per finished run, each student exported, paired differences against MD
    python benchmarks/learning_curve.py --out bench_out/finals --rows md_centred_kd_shift4 md_official_shift4 \\
        arcface_shift4 zoo_finalists --screen benchmarks/results/zoo_screen_split49_8ep_2026-12-07.json \\
        --baseline md_centred_kd_shift4 --budgets 16 --seeds 0 1 \\
        --exclude recipes/splits/celeba299_49/val_identities.txt \\
        --val-pairs recipes/splits/celeba299_49/val_pairs.tsv --export benchmarks/results/students \\
        --results benchmarks/results/zoo_finals_16ep.json --resume

The screen and the final rows train on the 250 identities of ``recipes/splits/celeba299_49`` and choose on its 2000
pairs (why: that folder's README); ``--train ../shared/data/celeba299 ../shared/data/celeba_extra`` trains on both
roots as one set.

The results JSON is the study's memory: a (row, budget, seed) already in it with the same overrides is not run
again, even when its run directory is gone, so commit it as rows finish and a later session continues. A finished
run directory of the same config is reused; an interrupted one continues from its last checkpoint with
``--resume``. Beside ``--results`` (same stem): the table (``.md``), the curve (``.png``), and for each row at its
budget with the most seeds (the final rows' budget; ties go to the largest) the LFW ROC (``_roc.png``) and the
angles to the teacher's class centres (``_angles_ROW.png``), and where rows have several seeds their test accuracy
as bars (``_bars.png``).
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from facedistill.config import Config, apply_overrides, from_dict
from facedistill.data.datasets import open_training_set, scan_identity_folders
from facedistill.data.splits import read_identity_list
from facedistill.eval.metrics import VerificationResult, plot_roc
from facedistill.eval.verify import evaluate_pairs, load_pairs_set, student_embedder
from facedistill.pipeline import angles_to_centres, finished_run, plot_angle_histograms
from facedistill.teachers import create_teacher
from facedistill.teachers.cache import TeacherCache, build_teacher_cache
from facedistill.train.checkpoint import load_student
from facedistill.train.loop import RunSummary, model_profile, train

sys.path.insert(0, str(Path(__file__).resolve().parent))
import validation_study as study  # noqa: E402  (the study's rows and recipe: one definition of each)

# The teacher's LFW accuracy on the same 6000 pairs and the same evaluation path (the CPU protocol's run).
TEACHER_RESULTS = study.ROOT / "benchmarks" / "results" / "cpu_protocol_2026-11-27.json"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("bench_out/curve"), help="run directories and the cache")
    parser.add_argument(
        "--rows", nargs="+", default=["arcface", "md_centred_kd"],
        choices=["zoo", "zoo_chosen", "zoo_finalists", *sorted(study.ROWS)],
        help="rows of benchmarks/validation_study.py ('zoo': every zoo_* row; 'zoo_chosen': each peer's row that "
        "the tuning rule picks from --tuned; 'zoo_finalists': the peers the rule sends on from --screen)",
    )  # fmt: skip
    parser.add_argument("--tuned", type=Path, help="results JSON of the zoo's tuning study, for --rows zoo_chosen")
    parser.add_argument("--screen", type=Path, help="results JSON of the zoo's screen, for --rows zoo_finalists")
    parser.add_argument(
        "--baseline", help="the row the table's paired test differences are taken against (default: ArcFace's row)"
    )
    parser.add_argument("--budgets", nargs="+", type=float, default=[4.0, 8.0, 16.0, 36.0], help="epochs")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--resume", action="store_true", help="continue interrupted runs from their last checkpoint")
    parser.add_argument("--val-only", action="store_true", help="validation only: the test set is not read")
    parser.add_argument("--export", type=Path, help="export each finished run's student to ONNX in this directory")
    parser.add_argument("--results", type=Path, help="results JSON (default OUT/learning_curve.json)")
    parser.add_argument("--cache", type=Path, help="teacher cache of the training set (default: built in OUT)")
    parser.add_argument("--teacher", default="sface", help="teacher spec for the cache ('none' with --cache)")
    parser.add_argument(
        "--train", nargs="+", default=[str(study.SHARED / "celeba299")],
        help="training identity folders; several roots train as one set (OUT/train_merged: a link per identity)",
    )  # fmt: skip
    parser.add_argument(
        "--exclude", default=str(study.SPLIT / "val_identities.txt"), help="identities left out ('none': none)"
    )
    parser.add_argument("--val-pairs", default=str(study.SPLIT / "val_pairs.tsv"))
    parser.add_argument("--val-images", default=str(study.SHARED / "celeba299"))
    parser.add_argument("--test-pairs", default=str(study.SHARED / "lfw_pairs.txt"), help="read once per run")
    parser.add_argument("--test-images", default=str(study.SHARED / "lfw"))
    parser.add_argument("--teacher-test", type=float, help="the teacher's test accuracy (%%) drawn as a line")
    parser.add_argument(
        "--checkpoint-every", type=int, default=22, help="steps (22 = half an epoch of 5,686 images at batch 128)"
    )
    parser.add_argument(
        "--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides for every run (dotted keys)"
    )
    args = parser.parse_args(argv)
    zoo = [row for row in study.ROWS if row.startswith("zoo_")]

    def rule_choice(row: str, flag: str, choose: Any) -> Any:
        """What a validation rule picks from the results file a row alias reads (None where it is not asked for)."""
        path = getattr(args, flag)
        if row not in args.rows:
            return None
        if path is None:
            parser.error(f"--rows {row} needs --{flag}: the results JSON that rule reads")
        try:
            return choose(json.loads(path.read_text())["runs"])
        except (OSError, ValueError, KeyError) as error:
            parser.error(f"--{flag} {path}: {error}")

    args.chosen = rule_choice("zoo_chosen", "tuned", study.choose_tuned)
    args.finalists = rule_choice("zoo_finalists", "screen", study.choose_finalists)
    expand = {
        "zoo": zoo,
        "zoo_chosen": list(args.chosen.values()) if args.chosen else [],
        "zoo_finalists": args.finalists or [],
    }
    args.rows = list(dict.fromkeys(name for row in args.rows for name in expand.get(row, [row])))
    if args.baseline is not None and args.baseline not in args.rows:
        parser.error(f"--baseline {args.baseline} is not one of the rows asked for: {args.rows}")
    return args


def merged_training_folder(roots: list[str], folder: Path) -> Path:
    """One identity-folder set made of several roots: ``folder/<identity>`` links to ``root/<identity>``. Identity
    names must not repeat across roots (they would be one class); a link already there must point where asked."""
    folder.mkdir(parents=True, exist_ok=True)
    owner: dict[str, Path] = {}
    for root in map(Path, roots):
        try:
            identities = scan_identity_folders(root)  # the training set's own listing
        except FileNotFoundError as error:
            raise SystemExit(f"--train: {error}") from None
        for identity in identities:
            if identity in owner:
                raise SystemExit(f"--train: identity {identity!r} is in both {owner[identity]} and {root}")
            owner[identity] = root
            link, target = folder / identity, (root / identity).resolve()
            if link.is_symlink() and link.resolve() != target:
                raise SystemExit(f"{link} links to {link.resolve()}, not {target}: delete {folder} and run again")
            if not link.is_symlink():
                link.symlink_to(target, target_is_directory=True)
    stale = sorted(entry.name for entry in folder.iterdir() if entry.name not in owner)
    if stale:
        raise SystemExit(f"{folder} holds identities of no --train root ({stale[:3]}): delete it and run again")
    return folder


def run_key(row: str, budget: float, seed: int) -> str:
    return f"{row}_{budget:g}ep_seed{seed}"


def run_config(args: argparse.Namespace, row: str, budget: float, seed: int, cache: Path) -> Config:
    """The study's row for ``budget`` epochs, validated every epoch, with this script's data and overrides."""
    data = study.row_config(row, seed, budget, args.out, cache).to_dict()
    data["run"]["output_dir"] = str(args.out / "runs" / run_key(row, budget, seed))
    exclude = None if args.exclude == "none" else args.exclude
    data["data"].update(
        train=args.train, exclude_identities=exclude, val_pairs=args.val_pairs, val_images=args.val_images
    )
    # Validation per epoch is the curve's resolution; it only records (the last checkpoint is what gets tested).
    data["train"].update(val_every_epochs=1.0, checkpoint_every=args.checkpoint_every)
    data["teacher"]["spec"] = None if args.teacher == "none" else args.teacher
    return from_dict(Config, apply_overrides(data, args.set))


def train_or_reuse(config: Config, resume: bool) -> RunSummary:
    summary = finished_run(config, test_name=None)
    if summary is not None:
        return summary
    run_dir = Path(config.run.output_dir)
    if (run_dir / "last.pt").exists() and not resume:
        raise SystemExit(
            f"{run_dir} holds an unfinished run (last.pt): pass --resume to continue it, or delete it to start again"
        )
    return train(config, resume=resume)


def val_history(run_dir: Path) -> list[dict[str, float]]:
    """One row per validated step from ``val.csv`` (a resumed run may have logged a step twice: the last wins)."""
    by_step: dict[int, dict[str, float]] = {}
    with (run_dir / "val.csv").open() as handle:
        for row in csv.DictReader(handle):
            by_step[int(row["step"])] = {key: float(value) for key, value in row.items() if value not in ("", None)}
    return [by_step[step] for step in sorted(by_step)]


def test_once(run_dir: Path, embedder: Any, test_set: Any) -> dict[str, Any]:
    """The finished run's last checkpoint on the test set, evaluated once and kept in the run directory."""
    saved = run_dir / "test_once.json"
    if not saved.exists():
        result, _ = evaluate_pairs(embedder, test_set, num_workers=1, progress=False)
        saved.write_text(json.dumps(result.to_dict(), default=str))
    return json.loads(saved.read_text())


def export_student(checkpoint: Path, onnx_path: Path) -> None:
    """The user's own command, so that the file is what ``facedistill export`` writes (metadata included)."""
    if onnx_path.exists():
        return
    onnx_path.parent.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "facedistill.cli", "export", str(checkpoint), "--output", str(onnx_path)]
    subprocess.run(command, check=True)


def measure_run(
    args: argparse.Namespace, row: str, budget: float, seed: int, config: Config, context: dict[str, Any]
) -> dict[str, Any]:
    summary = train_or_reuse(config, args.resume)
    run_dir = Path(config.run.output_dir)
    history = val_history(run_dir)
    student, _ = load_student(run_dir / "last.pt")
    embedder = student_embedder(student)
    if args.export is not None:
        export_student(run_dir / "last.pt", args.export / f"{run_key(row, budget, seed)}.onnx")
    angles = angles_to_centres(embedder, context["sample"], context["centres"](row), progress=False)
    return {
        "row": row,
        "budget_epochs": budget,
        "train_set": context["train_set"],
        "seed": seed,
        "overrides": study.ROWS[row],
        "set": args.set,
        "train_minutes": summary.train_seconds / 60,
        "images_per_second": summary.images_per_second,
        "val_history": history,
        "val_accuracy": summary.validation["accuracy"],
        "val_std": summary.validation["std"],
        "val_auc": history[-1].get("auc") if history else None,
        "final_train_loss": study.final_loss(run_dir),
        "test": None if args.val_only else test_once(run_dir, embedder, context["test_set"]),
        "angles": np.round(angles, 2).tolist(),
        "model": model_profile(config),
    }


def aggregate(report: dict[str, Any]) -> dict[tuple[str, float], list[dict[str, Any]]]:
    groups: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for entry in report["runs"].values():
        groups.setdefault((entry["row"], entry["budget_epochs"]), []).append(entry)
    for entries in groups.values():
        entries.sort(key=lambda entry: entry["seed"])
    return dict(sorted(groups.items(), key=lambda item: (item[0][1], item[0][0])))


def folds(entries: list[dict[str, Any]]) -> np.ndarray:
    return np.concatenate([entry["test"]["fold_accuracies"] for entry in entries]) * 100


def table(report: dict[str, Any], baseline: str) -> list[str]:
    groups = aggregate(report)
    any_tested = any(entry["test"] is not None for entry in report["runs"].values())
    test = f"{report['test_name']} (read once per finished run, never for a choice)" if any_tested else "not read"
    lines = [
        f"host {report['machine']['host']}, {report['machine']['cpus']} CPUs, torch {report['machine']['torch']}; "
        f"test: {test}; val: {report['val_name']}",
        "",
        "| row | epochs | seeds | train min | img/s | val acc. % (last epoch) | val AUC % | best val epoch | "
        f"test acc. % (mean ± std, seeds x folds) | paired diff. to {baseline} (pp) | TAR@FAR=1e-3 | "
        "train loss (last tenth) | angle to centre (deg) | params / MACs |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (row, budget), entries in groups.items():
        tested = all(entry["test"] is not None for entry in entries)
        scores = folds(entries) if tested else None
        diff = "–"
        base = [entry for entry in groups.get((baseline, budget), []) if entry["test"] is not None]
        base_by_seed = {entry["seed"]: entry for entry in base}
        if scores is not None and row != baseline and all(entry["seed"] in base_by_seed for entry in entries):
            delta = scores - folds([base_by_seed[entry["seed"]] for entry in entries])
            diff = f"{delta.mean():+.2f} ± {delta.std(ddof=1):.2f}"
        best_epochs = []
        for entry in entries:
            history = [point for point in entry["val_history"] if "epoch" in point]
            best = max(history, key=lambda point: point["accuracy"]) if history else None
            best_epochs.append(f"{best['epoch']:.0f}" if best else "–")
        aucs = [entry["val_auc"] for entry in entries if entry["val_auc"] is not None]
        losses = [entry["final_train_loss"] for entry in entries if entry["final_train_loss"] is not None]
        # None where the test set has too few impostor pairs to reach FAR 1e-3.
        tars = [entry["test"]["tar_at_far"].get("0.001") if tested else None for entry in entries]
        tar = "–" if None in tars else f"{statistics.mean(float(value) for value in tars) * 100:.2f}"
        angle = statistics.mean(float(np.mean(entry["angles"])) for entry in entries)
        model = entries[0]["model"]
        cells = [
            row,
            f"{budget:g}",
            ", ".join(str(entry["seed"]) for entry in entries),
            f"{statistics.mean(entry['train_minutes'] for entry in entries):.1f}",
            f"{statistics.mean(entry['images_per_second'] for entry in entries):.1f}",
            ", ".join(f"{entry['val_accuracy'] * 100:.2f}" for entry in entries),
            f"{statistics.mean(aucs) * 100:.2f}" if aucs else "–",
            ", ".join(best_epochs),
            "– (val only)" if scores is None else f"{scores.mean():.2f} ± {scores.std(ddof=1):.2f}",
            diff,
            tar,
            f"{statistics.mean(losses):.2f}" if losses else "–",
            f"{angle:.1f} (teacher {report['teacher_angle_mean'][row]:.1f})",
            f"{model['name']}-{model['embedding_size']}: {model['params'] / 1e6:.2f} M / {model['macs'] / 1e9:.3f} G",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def plot_curve(report: dict[str, Any], teacher_test: float | None, out_png: Path) -> None:
    """Test and validation accuracy against training minutes, per row; the dotted lines are each run's per-epoch
    validation (its own cosine schedule), the markers its end."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8.0, 5.0))
    axes = figure.subplots()
    groups = aggregate(report)
    rows = list(dict.fromkeys(row for row, _ in groups))
    for index, row in enumerate(rows):
        color = f"C{index}"
        points = [(budget, entries) for (name, budget), entries in groups.items() if name == row]
        minutes = [statistics.mean(entry["train_minutes"] for entry in entries) for _, entries in points]
        tested = [
            (minute, folds(entries))
            for minute, (_, entries) in zip(minutes, points, strict=True)
            if all(entry["test"] is not None for entry in entries)
        ]
        if tested:
            axes.errorbar(
                [m for m, _ in tested], [score.mean() for _, score in tested],
                yerr=[score.std(ddof=1) for _, score in tested], color=color, marker="o", capsize=3,
                label=f"{row}: {report['test_name']} (fold std)",
            )  # fmt: skip
        vals = [statistics.mean(entry["val_accuracy"] * 100 for entry in entries) for _, entries in points]
        axes.plot(minutes, vals, color=color, marker="s", linestyle="--", label=f"{row}: val, end of run")
        for _, entries in points:
            for entry in entries:
                per_epoch = entry["train_minutes"] / entry["budget_epochs"]
                history = [point for point in entry["val_history"] if "epoch" in point]
                axes.plot(
                    [point["epoch"] * per_epoch for point in history],
                    [point["accuracy"] * 100 for point in history],
                    color=color, linestyle=":", linewidth=0.8, alpha=0.6,
                )  # fmt: skip
    if teacher_test is not None:
        axes.axhline(teacher_test, color="black", linestyle="-.", label=f"teacher (SFace): {teacher_test:.2f}")
    axes.set_xlabel("training minutes (this machine)")
    axes.set_ylabel("accuracy (%)")
    axes.set_title("Learning curve: each budget its own run (dotted: per-epoch validation)")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7, loc="lower right")
    figure.tight_layout()
    figure.savefig(out_png, dpi=120)


def plot_bars(report: dict[str, Any], teacher_test: float | None, out_png: Path) -> bool:
    """The final rows side by side: test accuracy (mean ± std over seeds x folds) of each row at its budget with
    the most seeds, labelled with its training minutes. Drawn only where some row has two or more tested seeds."""
    tested = {
        row: entries
        for row, entries in plotted_runs(report).items()
        if all(entry["test"] is not None for entry in entries)
    }
    if not any(len(entries) > 1 for entries in tested.values()):
        return False
    from matplotlib.figure import Figure

    scores = {row: folds(entries) for row, entries in tested.items()}
    rows = sorted(scores, key=lambda row: scores[row].mean())
    figure = Figure(figsize=(8.0, 0.5 * len(rows) + 1.8))
    axes = figure.subplots()
    means = [scores[row].mean() for row in rows]
    stds = [scores[row].std(ddof=1) for row in rows]
    axes.barh(range(len(rows)), means, xerr=stds, color="C0", alpha=0.8, capsize=3)
    labels = []
    for row in rows:
        entries = tested[row]
        minutes = statistics.mean(entry["train_minutes"] for entry in entries)
        labels.append(f"{row}\n{entries[0]['budget_epochs']:g} ep, {len(entries)} seeds, {minutes:.0f} min")
    axes.set_yticks(range(len(rows)), labels, fontsize=7)
    if teacher_test is not None:
        axes.axvline(teacher_test, color="black", linestyle="-.", label=f"teacher (SFace): {teacher_test:.2f}")
        axes.legend(fontsize=7, loc="lower right")
    low = min(mean - std for mean, std in zip(means, stds, strict=True))
    axes.set_xlim(max(0.0, low - 3.0), 100.0 if teacher_test is None else max(teacher_test + 1.0, max(means) + 3.0))
    axes.set_xlabel(f"{report['test_name']} accuracy (%), mean ± std over seeds x folds")
    axes.grid(alpha=0.3, axis="x")
    figure.tight_layout()
    figure.savefig(out_png, dpi=120)
    return True


def teacher_test_accuracy(args: argparse.Namespace) -> float | None:
    if args.teacher_test is not None:
        return args.teacher_test
    if TEACHER_RESULTS.exists() and args.test_pairs == str(study.SHARED / "lfw_pairs.txt"):
        return float(json.loads(TEACHER_RESULTS.read_text())["teacher"]["test"]["accuracy_mean"]) * 100
    return None


def paired_baseline(report: dict[str, Any], rows: list[str]) -> str:
    """The row every other is paired against: plain ArcFace where the report has it, else its first ArcFace row
    (an ablation file compares against ArcFace under the same data), else the first row asked for."""
    runs = report["runs"].values()
    if any(entry["row"] == "arcface" for entry in runs):
        return "arcface"
    # Each entry's stored overrides, not today's ROWS: an old results file may hold a row renamed since.
    arcface_rows = [entry["row"] for entry in runs if entry["overrides"].get("method", {}).get("name") == "arcface"]
    return arcface_rows[0] if arcface_rows else rows[0]


def plotted_runs(report: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """For each row, the runs its ROC and angle histogram show: the budget with the most seeds (a final row's
    budget, chosen on val), ties going to the largest budget."""
    chosen: dict[str, list[dict[str, Any]]] = {}
    for (row, _), entries in aggregate(report).items():  # budgets ascend, so ">=" keeps the larger on a tie
        if len(entries) >= len(chosen.get(row, [])):
            chosen[row] = entries
    return chosen


def write_outputs(report: dict[str, Any], args: argparse.Namespace, stem: Path) -> None:
    lines = table(report, args.baseline or paired_baseline(report, args.rows))
    if report.get("tuned"):
        tuned = report["tuned"]
        picks = ", ".join(f"{method}: {row}" for method, row in tuned["chosen"].items())
        lines += ["", f"Peers as tuned on validation ({tuned['file']}, highest val AUC, accuracy within "
                  f"{study.TIE_PP} pp): {picks}"]  # fmt: skip
    if report.get("finalists"):
        finalists = report["finalists"]
        lines += ["", f"Peers sent on by the screen ({finalists['file']}, the same rule, {study.FINALISTS} times): "
                  + ", ".join(finalists["rows"])]  # fmt: skip
    Path(f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    teacher_test = teacher_test_accuracy(args)
    plot_curve(report, teacher_test, Path(f"{stem}.png"))
    plot_bars(report, teacher_test, Path(f"{stem}_bars.png"))
    plotted = plotted_runs(report)
    curves = {
        f"{row} {entry['budget_epochs']:g} ep seed {entry['seed']}": VerificationResult.from_dict(entry["test"])
        for row, entries in plotted.items()
        for entry in entries
        if entry["test"] is not None
    }
    if curves:
        title = f"{report['test_name']}, each row at its budget with the most seeds (last checkpoint)"
        plot_roc(curves, Path(f"{stem}_roc.png"), title)
    for row, entries in plotted.items():
        angles = {
            f"{row} {entry['budget_epochs']:g} ep seed {entry['seed']}": np.array(entry["angles"]) for entry in entries
        }
        angles["teacher (SFace)"] = np.array(report["teacher_angles"][row])
        plot_angle_histograms(
            angles,
            Path(f"{stem}_angles_{row}.png"),
            f"Angle to the teacher's class centre, 1024 training images: {row}",
        )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    results_path = args.results or args.out / "learning_curve.json"
    results_path.parent.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = json.loads(results_path.read_text()) if results_path.exists() else {"runs": {}}
    report["machine"] = {"host": platform.node(), "cpus": torch.get_num_threads(), "torch": torch.__version__}
    report["val_name"] = Path(args.val_pairs).name
    if args.chosen:
        report["tuned"] = {"file": str(args.tuned), "chosen": args.chosen}
    if args.finalists:
        report["finalists"] = {"file": str(args.screen), "rows": args.finalists}
    report["test_name"] = (
        "LFW" if args.test_pairs == str(study.SHARED / "lfw_pairs.txt") else Path(args.test_pairs).name
    )

    roots = args.train
    args.train = roots[0] if len(roots) == 1 else str(merged_training_folder(roots, args.out / "train_merged"))
    exclude = None if args.exclude == "none" else read_identity_list(args.exclude)
    dataset = open_training_set(args.train, exclude=exclude)
    cache_dir = args.cache or args.out / "teacher_cache"
    if args.cache is None:
        if args.teacher == "none":
            raise SystemExit("--teacher none needs --cache: the cache of the training set to train against")
        build_teacher_cache(create_teacher(args.teacher), dataset, cache_dir, num_workers=1)
    cache = TeacherCache(cache_dir)
    angle_rows, sample = study.angle_sample(dataset)
    centres: dict[str, torch.Tensor] = {}
    report.setdefault("teacher_angles", {})
    report.setdefault("teacher_angle_mean", {})

    def row_centres(row: str) -> torch.Tensor:
        if row not in centres:
            centres[row], teacher_angles = study.row_centres(row, cache, dataset)
            report["teacher_angles"][row] = np.round(teacher_angles[angle_rows], 2).tolist()
            report["teacher_angle_mean"][row] = float(teacher_angles[angle_rows].mean())
        return centres[row]

    # What a run trained on (the set's fingerprint names its images and exclusions): a row measured on another
    # training set is not this one. Entries written before this was recorded trained on the default set.
    train_set = {"name": Path(args.train).name, "fingerprint": dataset.fingerprint(), "identities": dataset.num_classes}
    context: dict[str, Any] = {"sample": sample, "centres": row_centres, "test_set": None, "train_set": train_set}
    stem = results_path.with_suffix("")
    for row in args.rows:
        row_centres(row)
    # Budgets ascending and seed-major, so that an interrupted study already holds a complete short curve.
    for budget in sorted(args.budgets):
        for seed in args.seeds:
            for row in args.rows:
                key = run_key(row, budget, seed)
                entry = report["runs"].get(key)
                same = json.loads(json.dumps(study.ROWS[row]))
                if entry is not None and entry.get("train_set", train_set)["fingerprint"] != train_set["fingerprint"]:
                    raise SystemExit(
                        f"{results_path} holds {key} trained on {entry['train_set']['name']} "
                        f"({entry['train_set']['identities']} identities), not on this --train/--exclude "
                        f"({train_set['identities']}): give this training set its own --results (and --out)"
                    )
                measured = entry is not None and entry["overrides"] == same and entry["set"] == args.set
                # A val-only row read again without --val-only is tested from its run, not trained again.
                if measured and (args.val_only or entry["test"] is not None):
                    continue
                if context["test_set"] is None and not args.val_only:
                    context["test_set"] = load_pairs_set(args.test_pairs, args.test_images, name="test")
                config = run_config(args, row, budget, seed, cache_dir)
                report["runs"][key] = measure_run(args, row, budget, seed, config, context)
                results_path.write_text(json.dumps(report) + "\n")
                write_outputs(report, args, stem)
    results_path.write_text(json.dumps(report) + "\n")
    if report["runs"]:
        write_outputs(report, args, stem)
    return report


if __name__ == "__main__":
    main()
