"""A markdown report of one training run, built only from what its run directory holds.

``write_run_report(run_dir)`` reads ``config.yaml``, ``results.json``, ``train.csv``, ``val.csv`` and the
``roc_*.png`` plots the training loop writes, draws ``training_curves.png`` (loss terms, learning rate and
validation accuracy against the step) and ``sample_grid.png`` (the first aligned training image of the first
identities, the quickest check that the data the model saw is what was intended), and writes ``report.md``
linking them. Whatever is missing -- an interrupted run has no results, a training set on another machine has
no samples -- is skipped with a note in the report rather than an error, so the report can be written for any
run directory at any time.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from facedistill.eval.metrics import VerificationResult, format_tar, unestimated_tar_note

__all__ = ["write_run_report"]

REPORT = "report.md"
CURVES_PNG = "training_curves.png"
SAMPLES_PNG = "sample_grid.png"
# train.csv columns that are not loss terms.
_NOT_LOSS = {"step", "lr", "images_per_second", "epoch"}


def _atomic_write(path: Path, write: Callable[[io.BufferedWriter], None]) -> None:
    # Same folder so the rename is atomic; a crash never leaves a truncated file under the final name.
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "wb") as handle:
            write(handle)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _read_csv(path: Path) -> dict[str, np.ndarray]:
    """Numeric columns by name, one row per step (the last one wins: a resumed run re-logs some steps)."""
    by_step: dict[float, dict[str, float]] = {}
    with open(path, newline="") as handle:
        for row in csv.DictReader(handle):
            values: dict[str, float] = {}
            for key, text in row.items():
                if key is None:
                    continue
                try:
                    values[key] = float(text)
                except (TypeError, ValueError):
                    continue
            if "step" in values:
                by_step[values["step"]] = values
    steps = sorted(by_step)
    keys = sorted({key for values in by_step.values() for key in values})
    return {key: np.array([by_step[s].get(key, math.nan) for s in steps]) for key in keys}


def _plot_curves(train: dict[str, np.ndarray], val: dict[str, np.ndarray] | None, out: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = 3 if val and "accuracy" in val else 2
    fig = Figure(figsize=(4.2 * panels, 3.6), dpi=110)
    FigureCanvasAgg(fig)
    steps = train["step"]

    ax = fig.add_subplot(1, panels, 1)
    terms = sorted(key for key in train if key not in _NOT_LOSS and key != "loss")
    # A single-term method logs its term and the total identically; drawing both just hides one line.
    terms = [key for key in terms if "loss" not in train or not np.array_equal(train[key], train["loss"])]
    if "loss" in train:
        ax.plot(steps, train["loss"], label="loss (total)", linewidth=1.6, color="black")
    for key in terms:
        ax.plot(steps, train[key], label=key, linewidth=1.0, alpha=0.8)
    ax.set_xlabel("step")
    ax.set_title("training loss")
    ax.grid(True, alpha=0.3)
    if terms or "loss" in train:
        ax.legend(fontsize="small")

    ax = fig.add_subplot(1, panels, 2)
    if "lr" in train:
        ax.plot(steps, train["lr"], color="tab:orange")
    ax.set_xlabel("step")
    ax.set_title("learning rate")
    ax.grid(True, alpha=0.3)

    if panels == 3 and val is not None:
        ax = fig.add_subplot(1, panels, 3)
        ax.plot(val["step"], 100.0 * val["accuracy"], marker="o", color="tab:green")
        ax.set_xlabel("step")
        ax.set_title("validation accuracy (%)")
        ax.grid(True, alpha=0.3)
    fig.tight_layout()
    _atomic_write(out, lambda handle: fig.savefig(handle, format="png"))


def _sample_grid(train_path: Path, out: Path, identities: int, exclude: Path | None = None) -> tuple[int, int]:
    """Tile the first image of the first ``identities`` training identities (held-out ones excluded); returns
    (tiles drawn, unreadable skipped)."""
    from PIL import Image

    from facedistill.data.datasets import open_training_set
    from facedistill.data.splits import read_identity_list

    dataset = open_training_set(train_path, exclude=read_identity_list(exclude) if exclude else None)
    _, first = np.unique(np.asarray(dataset.labels), return_index=True)
    tiles = []
    skipped = 0
    for index in first[:identities]:
        try:
            image, _, _ = dataset[int(index)]
        except (ValueError, OSError):  # ImageDecodeError and RecordIOError are ValueErrors
            skipped += 1
            continue
        tiles.append(image.permute(1, 2, 0).numpy())
    if not tiles:
        raise ValueError(f"none of the first {identities} identities of {train_path} has a readable image")
    h, w = tiles[0].shape[:2]
    cols = math.ceil(math.sqrt(len(tiles)))
    rows = math.ceil(len(tiles) / cols)
    gap = 2
    canvas = np.full((rows * (h + gap) + gap, cols * (w + gap) + gap, 3), 255, dtype=np.uint8)
    for k, tile in enumerate(tiles):
        r, c = divmod(k, cols)
        y, x = gap + r * (h + gap), gap + c * (w + gap)
        canvas[y : y + tile.shape[0], x : x + tile.shape[1]] = tile[:h, :w]
    _atomic_write(out, lambda handle: Image.fromarray(canvas).save(handle, format="PNG"))
    return len(tiles), skipped


def _pct(value: float) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{100.0 * value:.2f}"


def _count(n: Any) -> str:
    from facedistill.models.complexity import format_count

    return format_count(n) if isinstance(n, (int, float)) and n else "-"


def _test_table(tests: dict[str, Any], flip: Any) -> list[str]:
    results = {name: VerificationResult.from_dict(data) for name, data in tests.items()}
    fars = sorted({far for r in results.values() for far in r.tar_at_far}, reverse=True)
    header = ["test set", "pairs", "accuracy (mean +- std, %)", *(f"TAR@FAR={far:g} (%)" for far in fars), "AUC"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, r in results.items():
        cells = [
            name,
            str(r.num_pairs),
            f"{100 * r.accuracy_mean:.2f} +- {100 * r.accuracy_std:.2f}",
            *(format_tar(r.tar_at_far.get(far, math.nan)) for far in fars),
            "n/a" if not math.isfinite(r.auc) else f"{r.auc:.4f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    flip_text = {True: " with flip test", False: " without flip test"}.get(flip, "")
    search = next(iter(results.values())).threshold_search
    lines.append(
        f"10-fold verification{flip_text}, threshold chosen on the other folds ({search} search); TAR@FAR on all pairs."
    )
    for far in fars:
        unestimated = {
            name: r.num_impostor
            for name, r in results.items()
            if far in r.tar_at_far and format_tar(r.tar_at_far[far]) == "-"
        }
        if unestimated:
            lines += ["", unestimated_tar_note(far, f"{far:g}", unestimated)]
        # A set evaluated without this FAR target shows '-' too, for another reason than its impostor pairs.
        not_computed = [name for name, r in results.items() if far not in r.tar_at_far]
        if not_computed:
            lines += ["", f"TAR@FAR={far:g} was not computed for {', '.join(not_computed)}."]
    return lines


def _load_yaml(path: Path, notes: list[str]) -> dict[str, Any]:
    if not path.is_file():
        notes.append(f"`{path.name}` not found: configuration not shown, no sample grid.")
        return {}
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        notes.append(f"`{path.name}` is not valid YAML ({error}).")
        return {}
    return data if isinstance(data, dict) else {}


def _load_json(path: Path, notes: list[str], missing: str) -> dict[str, Any]:
    if not path.is_file():
        notes.append(f"`{path.name}` not found: {missing}")
        return {}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        notes.append(f"`{path.name}` is not valid JSON ({error}).")
        return {}
    return data if isinstance(data, dict) else {}


def _model_profile(results: dict[str, Any], config: dict[str, Any], notes: list[str]) -> dict[str, Any]:
    profile = dict(results.get("model") or {})
    if profile.get("params") and profile.get("macs"):
        return profile
    section = config.get("model") or {}
    if not section.get("name"):
        notes.append("no model profile in results.json and no model in config.yaml: params/MACs not shown.")
        return profile
    try:
        from facedistill.models import count_macs, count_parameters, create_model

        net = create_model(section["name"], embedding_size=int(section.get("embedding_size", 512)))
        profile.update(
            name=section["name"],
            embedding_size=int(section.get("embedding_size", 512)),
            params=count_parameters(net),
            macs=count_macs(net),
        )
        notes.append("params/MACs computed from config.yaml (results.json has no model profile).")
    except (KeyError, TypeError, ValueError, RuntimeError) as error:
        notes.append(f"params/MACs could not be computed for model {section.get('name')!r} ({error}).")
    return profile


def write_run_report(run_dir: str | os.PathLike[str], sample_identities: int = 16) -> Path:
    """Write ``run_dir/report.md`` (plus ``training_curves.png`` and ``sample_grid.png``) and return its path.

    Reads ``config.yaml``, ``results.json``, ``train.csv``, ``val.csv``, ``roc_*.png`` and the training set named by
    the config's ``data.train``; each missing piece becomes a note in the report instead of an error. Only a missing
    ``run_dir`` raises.
    """
    run = Path(run_dir)
    if not run.is_dir():
        raise FileNotFoundError(f"run directory {run} does not exist")
    notes: list[str] = []
    config = _load_yaml(run / "config.yaml", notes)
    results = _load_json(run / "results.json", notes, "no test results or run summary (unfinished run?).")
    model_section = config.get("model") or {}
    method = (config.get("method") or {}).get("name", "?")
    data_section = config.get("data") or {}
    lines = [
        f"# Run report: {run.resolve().name}",
        "",
        f"Student `{model_section.get('name', '?')}` (embedding {model_section.get('embedding_size', '?')}), "
        f"method `{method}`, training set `{data_section.get('train', '?')}`.",
        "",
    ]
    lines += _run_section(results)
    lines += _tests_section(results, config, notes)
    lines += _model_section(run, results, config, notes)
    lines += _curves_section(run, notes)
    lines += _roc_section(run)
    lines += _samples_section(run, config, sample_identities, notes)
    if notes:
        lines += ["## Notes", ""] + [f"- {note}" for note in notes] + [""]
    out = run / REPORT
    text = "\n".join(lines)
    _atomic_write(out, lambda handle: handle.write(text.encode()))
    return out


def _run_section(results: dict[str, Any]) -> list[str]:
    if not results:
        return []
    facts = [
        ("steps", results.get("steps")),
        ("epochs", f"{results['epochs']:.2f}" if isinstance(results.get("epochs"), (int, float)) else None),
        ("training time (s)", f"{results['train_seconds']:.0f}" if results.get("train_seconds") else None),
        ("wall time (s)", f"{results['wall_seconds']:.0f}" if results.get("wall_seconds") else None),
        ("train images/s", f"{results['images_per_second']:.1f}" if results.get("images_per_second") else None),
        ("reported model", results.get("selected")),
        ("teacher", results.get("teacher_id")),
        ("class centres", results.get("centres")),
        ("skipped images", results.get("skipped_images") or None),
    ]
    lines = ["## Run", "", "| | |", "|---|---|"]
    lines += [f"| {name} | {value} |" for name, value in facts if value not in (None, "")]
    return [*lines, ""]


def _tests_section(results: dict[str, Any], config: dict[str, Any], notes: list[str]) -> list[str]:
    lines = ["## Test results", ""]
    tests = results.get("tests") or {}
    if tests:
        try:
            # EvalSection defaults to flip=True; without any config the protocol is unknown.
            lines += _test_table(tests, (config.get("eval") or {}).get("flip", True if config else None))
        except (KeyError, TypeError, ValueError) as error:
            notes.append(f"test results in results.json could not be read ({error}).")
            lines.append("_unreadable, see notes_")
    else:
        lines.append("_no test results (no `eval.tests` declared, or the run has not finished)_")
        if results:
            notes.append("results.json holds no test results.")
    validation = results.get("validation") or {}
    if validation.get("accuracy") is not None:
        lines.append("")
        lines.append(
            f"Last validation (step {validation.get('step', '?')}): "
            f"{_pct(validation['accuracy'])} +- {_pct(validation.get('std', math.nan))} %."
        )
    return [*lines, ""]


def _model_section(run: Path, results: dict[str, Any], config: dict[str, Any], notes: list[str]) -> list[str]:
    profile = _model_profile(results, config, notes)
    lines = ["## Model", ""]
    if profile.get("params"):
        lines.append(
            f"Params {_count(profile.get('params'))}, MACs {_count(profile.get('macs'))} per 112x112 image "
            "(Conv2d + Linear multiply-accumulates, as in the MobileFaceNet paper)."
        )
    else:
        lines.append("_not available_")
    exports = [(name, run / name) for name in ("model.onnx", "model.int8.onnx") if (run / name).is_file()]
    if exports:
        lines.append("")
        lines += [f"- `{name}`: {path.stat().st_size / 1e6:.2f} MB" for name, path in exports]
    return [*lines, ""]


def _curves_section(run: Path, notes: list[str]) -> list[str]:
    lines = ["## Training curves", ""]
    train_csv, val_csv = run / "train.csv", run / "val.csv"
    train_log = _read_csv(train_csv) if train_csv.is_file() else {}
    val_log = _read_csv(val_csv) if val_csv.is_file() else None
    if val_csv.is_file() and not (val_log and "accuracy" in val_log):
        val_log = None
        notes.append("`val.csv` has no accuracy rows.")
    if not train_csv.is_file():
        notes.append("`train.csv` not found: no training curves.")
        return [*lines, "_no training log_", ""]
    if "step" not in train_log:
        notes.append("`train.csv` has no rows yet: no training curves.")
        return [*lines, "_no training log rows_", ""]
    _plot_curves(train_log, val_log, run / CURVES_PNG)
    lines.append(f"![training curves]({CURVES_PNG})")
    if "loss" in train_log:
        lines.append("")
        lines.append(
            f"Loss {train_log['loss'][0]:.4f} at step {int(train_log['step'][0])} -> "
            f"{train_log['loss'][-1]:.4f} at step {int(train_log['step'][-1])}."
        )
    if val_log is not None:
        best = int(np.nanargmax(val_log["accuracy"]))
        lines.append("")
        lines.append(
            f"Best validation accuracy {_pct(val_log['accuracy'][best])} % at step {int(val_log['step'][best])}."
        )
    return [*lines, ""]


def _roc_section(run: Path) -> list[str]:
    lines = ["## ROC curves", ""]
    rocs = sorted(run.glob("roc_*.png"))
    if not rocs:
        return [*lines, "_no ROC plots in the run directory_", ""]
    for png in rocs:
        lines += [f"![{png.stem}]({png.name})", ""]
    return lines


def _samples_section(run: Path, config: dict[str, Any], sample_identities: int, notes: list[str]) -> list[str]:
    lines = ["## Training samples", ""]
    data_section = config.get("data") or {}
    train_path = data_section.get("train")
    if not train_path:
        lines.append("_no training set in config.yaml_")
        if config:
            notes.append("config.yaml names no training set (data.train): no sample grid.")
    elif not Path(train_path).exists():
        lines.append("_training set not available_")
        notes.append(f"training set `{train_path}` not found from {Path.cwd()}: no sample grid.")
    else:
        try:
            exclude = data_section.get("exclude_identities")
            drawn, skipped = _sample_grid(
                Path(train_path), run / SAMPLES_PNG, sample_identities, Path(exclude) if exclude else None
            )
            lines.append(f"First aligned image of each of the first {drawn} identities of `{train_path}`:")
            lines += ["", f"![training samples]({SAMPLES_PNG})"]
            if skipped:
                notes.append(f"{skipped} of the sampled training images could not be read.")
        except (ValueError, OSError) as error:
            lines.append("_training samples could not be read_")
            notes.append(f"sample grid not drawn: {error}")
    return [*lines, ""]
