"""Why MarginDistillation trailed ArcFace on the CPU protocol, and what it takes to lead: a study on the
celeba299 validation split (issue 15).

Every row is facedistill's own training loop on CelebA-299 minus the 30 held-out identities of
``recipes/splits/celeba299`` (269 identities, 5,686 images), MobileFaceNet-128, SFace teacher, and only the keys
the row names differ from the shared recipe below. Training never sees a test set: the runs carry no
``eval.tests``, and each run's validation accuracy (600 pairs of unseen identities, 10 folds, flip test) is what
rows are compared on.

    # ablations: train the named rows for one seed and print the validation table
    python benchmarks/validation_study.py --out bench_out/study --epochs 2 --rows arcface md md_noclip
    # the final table: the rows chosen on validation, for several seeds, then LFW once per model
    python benchmarks/validation_study.py --out bench_out/study --epochs 2 --seeds 0 1 \\
        --rows arcface md_faithful md_fixed md_fixed_kd --test

A run whose directory already holds a finished run of the same config is not trained again, so the final table
reuses the ablation's seed-0 runs. ``--test`` evaluates LFW on each run's last checkpoint (no checkpoint is
chosen), writes per-fold paired differences against the first row, ROC curves and the students' angles to the
teacher's class centres. Results: ``--out``/validation.{md,json} and, with ``--test``, ``--out``/final.{md,json},
``roc_final.png``, ``angles_<row>.png``.
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import math
import platform
import statistics
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Subset

from facedistill.config import Config, from_dict
from facedistill.data.datasets import open_training_set
from facedistill.data.splits import read_identity_list
from facedistill.eval.metrics import VerificationResult, plot_roc
from facedistill.eval.verify import evaluate_pairs, load_pairs_set, student_embedder
from facedistill.pipeline import angles_to_centres, finished_run, plot_angle_histograms
from facedistill.teachers import create_teacher
from facedistill.teachers.cache import TeacherCache, build_teacher_cache, class_centres
from facedistill.train.checkpoint import load_student
from facedistill.train.loop import model_profile, train

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
SPLIT = ROOT / "recipes" / "splits" / "celeba299"

# The CPU protocol's student recipe (benchmarks/cpu_protocol.py), with a half-epoch warm-up for short schedules.
BASE: dict[str, Any] = {
    "data": {"batch_size": 128, "num_workers": 1},
    "model": {"name": "mobilefacenet", "embedding_size": 128},
    "optim": {"name": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4},
    "schedule": {"name": "cosine", "warmup_epochs": 0.5},
    "train": {"amp": "none", "log_every": 11, "checkpoint_every": 1000, "export_onnx": False, "grad_clip": 5.0},
}

ARCFACE = {"name": "arcface", "scale": 32.0, "margin": 0.5}
# The toolkit's MarginDistillation fixes (dataset normaliser, clamp, guard) at the CPU protocol's scale, margin loss
# only (the study's rows add the angle term explicitly; the preset "facedistill" now turns it on by default).
MD = {"name": "margin_distillation", "scale": 32.0, "m_min": 0.2, "m_max": 0.5, "kd_weight": 0.0}
# The paper and the official code: s = 64, per-batch normaliser, no clamp, no guard.
MD_PAPER = {**MD, "scale": 64.0, "normaliser": "batch", "clamp": False, "guard": False}
NO_CLIP = {"train": {"grad_clip": None}}
CENTRED = {"teacher": {"subtract_mean": True}}
# The angle term beside the margin loss (the study's best at 4 and 8 epochs, with CENTRED).
KD = {**MD, "kd_weight": 1.0, "temperature": 4.0}

ROWS: dict[str, dict[str, Any]] = {
    "arcface": {"method": ARCFACE},
    "arcface_noclip": {"method": ARCFACE, **NO_CLIP},
    "md": {"method": MD},
    "md_noclip": {"method": MD, **NO_CLIP},
    "md_centred": {"method": MD, **CENTRED},
    "md_centred_noclip": {"method": MD, **CENTRED, **NO_CLIP},
    "md_s64": {"method": {**MD, "scale": 64.0}},
    "md_batchnorm": {"method": {**MD, "normaliser": "batch"}},
    "md_paper": {"method": MD_PAPER},
    "md_paper_noclip": {"method": MD_PAPER, **NO_CLIP},
    # A constant margin on the same frozen centres, at MD's mean margin over the training set:
    # 0.2 + 0.3 * 0.722 / 0.957 = 0.43 (mean and max teacher cosine to the centre, issue 15).
    "arcdistill": {"method": {"name": "arcdistill", "scale": 32.0, "margin": 0.43}},
    "md_kd": {"method": KD},
    "md_kd_noclip": {"method": KD, **NO_CLIP},
    "md_centred_kd": {"method": KD, **CENTRED},
    # Ablations of the best recipe over a longer schedule (benchmarks/learning_curve.py, issue 19). There is no
    # 512-d row: MarginDistillation trains against the teacher's 128-d centres, so the student's width is fixed by
    # the teacher's (the toolkit refuses a mismatch); capacity varies through the backbone instead (mbf).
    "md_centred_kd_w2": {"method": {**KD, "kd_weight": 2.0}, **CENTRED},
    "md_centred_kd_w05": {"method": {**KD, "kd_weight": 0.5}, **CENTRED},
    "md_centred_kd_t2": {"method": {**KD, "temperature": 2.0}, **CENTRED},
    "md_centred_kd_t8": {"method": {**KD, "temperature": 8.0}, **CENTRED},
    "md_centred_kd_emb1": {"method": {**KD, "embedding_weight": 1.0}, **CENTRED},
    # 1 - cos moves each student cosine with gradient 1, the margin loss at s = 32 with up to s (1 - p): weight 16
    # puts the dense per-image term on the margin loss's scale instead of 30x below it.
    "md_centred_kd_emb16": {"method": {**KD, "embedding_weight": 16.0}, **CENTRED},
    # Up to 4 pixels of translation: the teacher's embedding of a shifted image keeps cosine 0.92 to the cached one
    # (mirror: 0.95, another image of the same person: 0.50; benchmarks/teacher_shift_invariance.py), so the cache
    # still serves the target while the 269 identities' 5,686 images stop being seen identically every epoch.
    "md_centred_kd_shift4": {"method": KD, **CENTRED, "data": {"shift": 4}},
    "md_centred_kd_lr02": {"method": KD, **CENTRED, "optim": {"lr": 0.2}},
    "md_centred_kd_lr005": {"method": KD, **CENTRED, "optim": {"lr": 0.05}},
    "md_centred_kd_b64": {"method": KD, **CENTRED, "data": {"batch_size": 64}},
    "md_centred_kd_noflip": {"method": KD, **CENTRED, "data": {"flip": False}},
    "md_centred_kd_mbf": {"method": KD, **CENTRED, "model": {"name": "mbf"}},
    "md_kd_w2": {"method": {**KD, "kd_weight": 2.0}},
    "md_kd_t2": {"method": {**KD, "temperature": 2.0}},
    "md_lr02": {"method": MD, "optim": {"lr": 0.2}},
    "arcface_lr02": {"method": ARCFACE, "optim": {"lr": 0.2}},
    # The baseline with the same augmentation, so that a gain of md_centred_kd_shift4 is not the shift's alone.
    "arcface_shift4": {"method": ARCFACE, "data": {"shift": 4}},
    # The paper's MarginDistillation as the official code runs it (preset "official": s = 64, per-batch
    # normaliser, no clamp, no guard, no angle term, uncentred teacher) under the zoo's shared recipe.
    "md_official_shift4": {"method": {"name": "margin_distillation", "preset": "official"}, "data": {"shift": 4}},
}

# The distillation zoo on the validation split (issue 42): every peer under the recipe of md_centred_kd_shift4 and
# arcface_shift4 (shift 4, the same cache, schedule and seeds), with its paper's defaults except the shared ArcFace
# term's scale (s = 32, the CPU protocol's, which MD and ArcFace train with), the teacher centred as for MD wherever
# the method reads the teacher, and its one most sensitive key over two or three values (the first value is the
# paper's default), chosen on validation at the tuning budget. Where two values' AUCs were more than TIE_PP apart
# and the better one was the end of a numeric grid, a third value one step further out was added (embedding w64,
# angular a64, arcdistill m036, triplet w16, ekd x100; decided before any of them was trained), so that no peer's
# choice is a grid's edge the data still pointed past; where the new end won again by more than TIE_PP, one more
# step (angular a256, arcdistill m029, ekd x1000), and the rule chooses among all of a method's values. Two steps
# past the paper's grid is where the extension stops, whatever the last step showed. Triplet and EKD learn from
# pairs inside the batch, so they get identity-balanced batches (32 identities x 4 images); the others the random
# sampler.
SHIFT4 = {"data": {"shift": 4}}
BALANCED = {"data": {"shift": 4, "sampler": "identity_balanced", "images_per_identity": 4}}
PEER = {"scale": 32.0, "margin": 0.5}
ZOO_VARIANTS: dict[str, tuple[dict[str, Any], dict[str, Any], dict[str, dict[str, Any]]]] = {
    # method: (its defaults, its data, {row suffix: the tuned key's value})
    "kd": ({"name": "kd", **PEER, "kd_weight": 1.0}, SHIFT4, {"": {"temperature": 4.0}, "t2": {"temperature": 2.0},
                                                             "t8": {"temperature": 8.0}}),
    "gkd": ({"name": "gkd", **PEER}, SHIFT4, {"": {"warmup_epochs": 1.0}, "warm025": {"warmup_epochs": 0.25}}),
    "adadistill": ({"name": "adadistill", "scale": 32.0}, SHIFT4, {"": {"variant": "arc"}, "cos": {"variant": "cos"}}),
    "embedding": ({"name": "embedding", **PEER, "loss": "cosine", "head": "frozen"}, SHIFT4,
                  {"": {"weight": 1.0}, "w16": {"weight": 16.0}, "w64": {"weight": 64.0}}),
    "angular": ({"name": "angular", **PEER}, SHIFT4, {"": {"alpha": 1.0}, "a16": {"alpha": 16.0},
                                                    "a64": {"alpha": 64.0}, "a256": {"alpha": 256.0}}),
    "rkd": ({"name": "rkd", **PEER}, SHIFT4, {"": {"distance_weight": 25.0, "angle_weight": 50.0},
                                            "x02": {"distance_weight": 5.0, "angle_weight": 10.0}}),
    "arcdistill": ({"name": "arcdistill", "scale": 32.0}, SHIFT4, {"": {"margin": 0.5}, "m043": {"margin": 0.43},
                                                                  "m036": {"margin": 0.36}, "m029": {"margin": 0.29}}),
    "triplet": ({"name": "triplet", **PEER}, BALANCED, {"": {"triplet_weight": 1.0}, "w4": {"triplet_weight": 4.0},
                                                       "w16": {"triplet_weight": 16.0}}),
    "ekd": ({"name": "ekd", **PEER}, BALANCED, {"": {"positive_weight": 0.02, "negative_weight": 0.01},
                                               "x10": {"positive_weight": 0.2, "negative_weight": 0.1},
                                               "x100": {"positive_weight": 2.0, "negative_weight": 1.0},
                                               "x1000": {"positive_weight": 20.0, "negative_weight": 10.0}}),
}  # fmt: skip
# Every zoo method reads the teacher (its centres, its embeddings or both), so every zoo row reads it centred.
for _method, (_defaults, _data, _variants) in ZOO_VARIANTS.items():
    for _suffix, _value in _variants.items():
        ROWS["zoo_" + "_".join(filter(None, (_method, _suffix)))] = {
            "method": {**_defaults, **_value},
            **CENTRED,
            **copy.deepcopy(_data),
        }


def zoo_rows(method: str) -> list[str]:
    """The zoo rows of one peer method, its paper's default first."""
    return ["zoo_" + "_".join(filter(None, (method, suffix))) for suffix in ZOO_VARIANTS[method][2]]


# The zoo's tuning rule, fixed before any tuning row was read: the highest validation AUC (less noisy than
# accuracy on 600 pairs); where the runner-up's AUC is within TIE_PP of it, the higher validation accuracy.
TIE_PP = 0.3


def rule_pick(entries: list[dict[str, Any]]) -> dict[str, Any]:
    """The rule's winner among measured entries: the highest validation AUC; among the entries within TIE_PP of
    it, the highest validation accuracy."""
    best = max(entry["val_auc"] for entry in entries)
    close = [entry for entry in entries if (best - entry["val_auc"]) * 100 <= TIE_PP + 1e-9]
    return max(close, key=lambda entry: (entry["val_accuracy"], entry["val_auc"]))


def choose_tuned(runs: dict[str, dict[str, Any]]) -> dict[str, str]:
    """For every zoo method, the row the tuning rule picks from a results file's runs (one budget, seed 0)."""
    chosen: dict[str, str] = {}
    for method in ZOO_VARIANTS:
        rows = zoo_rows(method)
        entries = [entry for entry in runs.values() if entry["row"] in rows and entry["seed"] == 0]
        budgets = {entry["budget_epochs"] for entry in entries}
        missing = sorted(set(rows) - {entry["row"] for entry in entries})
        if missing or len(budgets) != 1:
            raise ValueError(
                f"tuning of {method} incomplete: rows {missing} not measured (seed 0), budgets {sorted(budgets)}; "
                "finish the tuning study first"
            )
        chosen[method] = rule_pick(entries)["row"]
    return chosen


# How many peers the screen sends to the final rows (issue 42: "the best three peers"), fixed before the screen.
FINALISTS = 3


def choose_finalists(runs: dict[str, dict[str, Any]], count: int = FINALISTS) -> list[str]:
    """The peers the screen sends to the finals: the tuning rule applied ``count`` times, each time to the peers
    not yet picked (so that count 1 is the rule itself). The screen holds one row per zoo method, seed 0, one
    budget; MD and ArcFace rows in it are not peers and go to the finals anyway."""
    method_of = {row: method for method in ZOO_VARIANTS for row in zoo_rows(method)}
    entries = [entry for entry in runs.values() if entry["row"] in method_of and entry["seed"] == 0]
    per_method: dict[str, list[str]] = {}
    for entry in entries:
        per_method.setdefault(method_of[entry["row"]], []).append(entry["row"])
    missing = sorted(set(ZOO_VARIANTS) - set(per_method))
    doubled = {method: rows for method, rows in per_method.items() if len(rows) > 1}
    budgets = sorted({entry["budget_epochs"] for entry in entries})
    if missing or doubled or len(budgets) != 1:
        raise ValueError(
            f"screen incomplete or ambiguous: methods {missing} not measured (seed 0), several rows of one method "
            f"{doubled}, budgets {budgets}; the screen holds each peer's tuned row once, at one budget"
        )
    finalists: list[str] = []
    for _ in range(min(count, len(entries))):
        finalists.append(rule_pick([entry for entry in entries if entry["row"] not in finalists])["row"])
    return finalists


# Whether the finals train on celeba_extra too (issue 42), fixed before its rows were read: only if, on the 2000
# validation pairs at 8 epochs, every measured row (MD and ArcFace) gains AUC with it, and the rows' mean gain is more
# than twice its standard error (each row's paired-bootstrap SE, the rows taken as independent). The extra set is
# 2.4 times the images per epoch, so a gain at the same epochs also costs 2.4 times the training time.
def adopt_extra_data(gains: dict[str, tuple[float, float]]) -> bool:
    """``gains``: per row, (AUC with the extra data minus without, in pp; that difference's bootstrap SE in pp)."""
    if not gains:
        raise ValueError("no rows measured with and without the extra data")
    mean = sum(difference for difference, _ in gains.values()) / len(gains)
    error = math.sqrt(sum(se * se for _, se in gains.values())) / len(gains)
    return all(difference > 0 for difference, _ in gains.values()) and mean > 2 * error


def publish(report: dict[str, Any], lines: list[str], results: Path | None) -> None:
    """Print a study's table; with ``results``, keep the report there (JSON) and the table beside it (.md)."""
    print("\n".join(lines))
    if results is not None:
        results.parent.mkdir(parents=True, exist_ok=True)
        results.write_text(json.dumps(report, indent=1) + "\n")
        results.with_suffix(".md").write_text("\n".join(lines) + "\n")


def merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key != "method":
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def row_config(row: str, seed: int, epochs: float, out: Path, cache: Path) -> Config:
    data = merge(BASE, ROWS[row])
    data["run"] = {"seed": seed, "output_dir": str(out / "runs" / f"{row}_seed{seed}")}
    data["data"].update(
        train=str(SHARED / "celeba299"),
        exclude_identities=str(SPLIT / "val_identities.txt"),
        val_pairs=str(SPLIT / "val_pairs.tsv"),
        val_images=str(SHARED / "celeba299"),
    )
    data["train"]["epochs"] = epochs
    data["train"]["val_every_epochs"] = epochs  # once, at the end: nothing is selected on it during a run
    data["teacher"] = {**data.get("teacher", {}), "spec": "sface", "cache": str(cache)}
    return from_dict(Config, data)


def final_loss(run_dir: Path) -> float | None:
    """Mean training loss over the last logged tenth of the run (``train.csv``), to see who is still learning."""
    path = run_dir / "train.csv"
    if not path.exists():
        return None
    with path.open() as handle:
        losses = [float(row["loss"]) for row in csv.DictReader(handle)]
    tail = losses[-max(1, len(losses) // 10) :]
    return float(np.mean(tail)) if tail else None


def entry_auc(config: Config) -> float:
    run_dir = Path(config.run.output_dir)
    saved = run_dir / "val_auc.json"
    if not saved.exists():
        student, _ = load_student(run_dir / "last.pt")
        val = load_pairs_set(config.data.val_pairs, config.data.val_images, name="val")
        result, _ = evaluate_pairs(student_embedder(student), val, num_workers=1, progress=False)
        saved.write_text(json.dumps({"auc": result.auc, "accuracy": result.accuracy_mean}))
    return float(json.loads(saved.read_text())["auc"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("bench_out/study"))
    parser.add_argument("--epochs", type=float, default=2.0)
    parser.add_argument("--rows", nargs="+", default=["arcface", "md"], choices=sorted(ROWS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--test", action="store_true", help="evaluate LFW once per model: final rows only")
    parser.add_argument("--cache", type=Path, help="teacher cache of the 269 training identities (else built)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    excluded = read_identity_list(SPLIT / "val_identities.txt")
    dataset = open_training_set(SHARED / "celeba299", exclude=excluded)
    cache_dir = args.cache or args.out / "teacher_cache"
    if args.cache is None:
        build_teacher_cache(create_teacher("sface"), dataset, cache_dir, num_workers=1)

    validation_path = args.out / "validation.json"
    table: dict[str, Any] = json.loads(validation_path.read_text()) if validation_path.exists() else {}
    for row in args.rows:
        for seed in args.seeds:
            config = row_config(row, seed, args.epochs, args.out, cache_dir)
            # Runs carry no test set: a finished run of the same config is reused without one.
            summary = finished_run(config, test_name=None) or train(config)
            key = f"{row}_seed{seed}"
            table[key] = {
                "row": row,
                "seed": seed,
                "epochs": args.epochs,
                "overrides": ROWS[row],
                "val_accuracy": summary.validation["accuracy"],
                "val_std": summary.validation["std"],
                # Less noisy than accuracy at 600 pairs: the area under the validation ROC of the same model.
                "val_auc": entry_auc(config),
                "final_train_loss": final_loss(Path(config.run.output_dir)),
                "images_per_second": summary.images_per_second,
                "train_seconds": summary.train_seconds,
            }
            validation_path.write_text(json.dumps(table, indent=2))
            print(f"{key}: val {table[key]['val_accuracy'] * 100:.2f} +- {table[key]['val_std'] * 100:.2f}")
    for entry in table.values():
        if "val_auc" not in entry:  # a row trained before the AUC was recorded
            entry["val_auc"] = entry_auc(row_config(entry["row"], entry["seed"], entry["epochs"], args.out, cache_dir))
    validation_path.write_text(json.dumps(table, indent=2))
    lines = [
        "| run | epochs | val acc. (mean +- fold std, %) | val AUC (%) | train loss (last tenth) | img/s | overrides |",
        "|---|---|---|---|---|---|---|",
    ]
    for key, entry in table.items():
        loss = entry["final_train_loss"]
        lines.append(
            f"| {key} | {entry['epochs']} | {entry['val_accuracy'] * 100:.2f} +- {entry['val_std'] * 100:.2f} | "
            f"{entry['val_auc'] * 100:.2f} | {'-' if loss is None else f'{loss:.2f}'} | "
            f"{entry['images_per_second']:.1f} | "
            f"`{json.dumps(entry['overrides'])}` |"
        )
    (args.out / "validation.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    if args.test:
        final_table(args, dataset, TeacherCache(cache_dir))


def angle_sample(dataset: Any, size: int = 1024) -> tuple[list[int], Subset]:
    """The training images whose angles to the centres are plotted: ``size`` rows drawn once (seed 0), in order."""
    rows = np.sort(np.random.default_rng(0).permutation(len(dataset))[:size]).tolist()
    return rows, Subset(dataset, rows)


def row_centres(row: str, cache: TeacherCache, dataset: Any) -> tuple[torch.Tensor, np.ndarray]:
    """The teacher's class centres a row's student is measured against, and the teacher's own angle (degrees) to
    them for every training image: centred centres for teacher.subtract_mean rows, the plain mean centres
    otherwise (ArcFace trains against none of its own)."""
    offset = cache.mean_embedding() if ROWS[row].get("teacher", {}).get("subtract_mean") else None
    centres, _ = class_centres(cache, dataset.labels, dataset.num_classes, "mean", offset)
    typicality = cache.typicality(centres, dataset.labels, offset=offset)[:, 0].clamp(-1, 1)
    return centres, np.degrees(np.arccos(typicality.numpy()))


def final_table(args: argparse.Namespace, dataset: Any, cache: TeacherCache) -> None:
    """LFW once per (row, seed): mean +- std over seeds and folds, paired per-fold differences to the first row."""
    lfw = load_pairs_set(SHARED / "lfw_pairs.txt", SHARED / "lfw", name="lfw")
    angle_rows, sample = angle_sample(dataset)
    final_path = args.out / "final.json"
    report: dict[str, Any] = json.loads(final_path.read_text()) if final_path.exists() else {}
    curves: dict[str, VerificationResult] = {}
    teacher_mean: dict[str, float] = {}
    for row in args.rows:
        centres, teacher_angles = row_centres(row, cache, dataset)
        teacher_angles = teacher_angles[angle_rows]
        teacher_mean[row] = float(teacher_angles.mean())
        for seed in args.seeds:
            key = f"{row}_seed{seed}"
            run_dir = args.out / "runs" / key
            if key not in report:
                student, _ = load_student(run_dir / "last.pt")
                result, _ = evaluate_pairs(student_embedder(student), lfw, num_workers=1)
                angles = angles_to_centres(student_embedder(student), sample, centres)
                report[key] = {"row": row, "seed": seed, "lfw": result.to_dict(), "angles": angles.tolist()}
                final_path.write_text(json.dumps(report))
            curves[key] = VerificationResult.from_dict(report[key]["lfw"])
        plot_angle_histograms(
            {f"{row} seed {s}": np.array(report[f"{row}_seed{s}"]["angles"]) for s in args.seeds}
            | {"teacher (SFace)": teacher_angles},
            args.out / f"angles_{row}.png",
            f"Angle to the teacher's class centre, 1024 training images: {row}",
        )
    plot_roc(curves, args.out / "roc_final.png", "CPU protocol students on LFW (last checkpoint, each seed)")
    baseline = args.rows[0]
    profile = model_profile(row_config(baseline, 0, args.epochs, args.out, cache.directory))
    lines = [
        f"LFW, 6000 pairs, 10 folds; MobileFaceNet-128: {profile['params'] / 1e6:.2f} M params, "
        f"{profile['macs'] / 1e9:.3f} G MACs; {args.epochs} epochs; seeds {args.seeds}; host {platform.node()}",
        "",
        f"| row | LFW acc. (mean +- std over seeds x folds, %) | per seed | paired diff. to {baseline} (mean +- std of "
        "per-fold diffs, pp) | TAR@FAR=1e-3 | angle to teacher centre (deg) |",
        "|---|---|---|---|---|---|",
    ]
    for row in args.rows:
        folds = np.concatenate([report[f"{row}_seed{s}"]["lfw"]["fold_accuracies"] for s in args.seeds]) * 100
        base = np.concatenate([report[f"{baseline}_seed{s}"]["lfw"]["fold_accuracies"] for s in args.seeds]) * 100
        diff = folds - base
        per_seed = ", ".join(f"{report[f'{row}_seed{s}']['lfw']['accuracy_mean'] * 100:.2f}" for s in args.seeds)
        tar = statistics.mean(float(report[f"{row}_seed{s}"]["lfw"]["tar_at_far"]["0.001"]) for s in args.seeds)
        angle = statistics.mean(float(np.mean(report[f"{row}_seed{s}"]["angles"])) for s in args.seeds)
        lines.append(
            f"| {row} | {folds.mean():.2f} +- {folds.std(ddof=1):.2f} | {per_seed} | "
            f"{diff.mean():+.2f} +- {diff.std(ddof=1) if row != baseline else 0.0:.2f} | {tar * 100:.2f} | "
            f"{angle:.1f} (teacher {teacher_mean[row]:.1f}) |"
        )
    (args.out / "final.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
