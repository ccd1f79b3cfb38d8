"""``facedistill demo``: the whole pipeline, end to end, in a few minutes on a laptop CPU.

Without arguments it generates face-like identities (a training set and held-out identities for verification),
trains a teacher with ArcFace, caches it, trains an ArcFace student and a MarginDistillation student with the same
recipe, evaluates all three, prints a table and draws their ROC curves. With ``--data --pairs --teacher`` it runs
the same pipeline on real faces.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from facedistill.config import Config, from_dict
from facedistill.data.synthetic import write_identity_folders, write_pairs_tsv
from facedistill.pipeline import compare_methods, markdown_table

if TYPE_CHECKING:
    from facedistill.teachers import Teacher


@dataclass(frozen=True)
class SyntheticSetup:
    """Sizes of the generated demo; the defaults finish in a few minutes on 2 CPU cores."""

    train_identities: int = 32
    images_per_identity: int = 10
    test_identities: int = 24
    test_images: int = 6
    pairs_per_fold: int = 20
    batch_size: int = 32
    teacher_epochs: float = 10.0
    student_epochs: float = 4.0


def student_recipe(epochs: float, batch_size: int, embedding_size: int) -> dict[str, Any]:
    """The recipe every student of a comparison shares (only the method differs)."""
    return {
        "run": {"seed": 0},
        "data": {"batch_size": batch_size, "num_workers": 1},
        "model": {"name": "mobilefacenet", "embedding_size": embedding_size},
        "optim": {"name": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4},
        "schedule": {"name": "cosine", "warmup_epochs": 1.0},
        "train": {
            "epochs": epochs,
            "amp": "auto",
            "log_every": 5,
            "checkpoint_every": 200,
            "export_onnx": True,
        },
    }


def student_methods(scale: float) -> dict[str, dict[str, Any]]:
    return {
        "arcface": {"method": {"name": "arcface", "scale": scale, "margin": 0.5}},
        "margin_distillation": {"method": {"name": "margin_distillation", "scale": scale, "m_min": 0.2, "m_max": 0.5}},
    }


def _synthetic_teacher(out: Path, train_dir: Path, setup: SyntheticSetup, progress: bool) -> str:
    """Train the demo's teacher with the same loop (ArcFace, longer than the students); return its checkpoint."""
    from facedistill.train.loop import train

    recipe = student_recipe(setup.teacher_epochs, setup.batch_size, 128)
    recipe.update(
        run={"seed": 1, "output_dir": str(out / "teacher")},
        data={"train": str(train_dir), "batch_size": setup.batch_size, "num_workers": 1},
        method={"name": "arcface", "scale": 32.0, "margin": 0.3},
    )
    recipe["train"]["export_onnx"] = False
    teacher_run = out / "teacher"
    if not (teacher_run / "results.json").exists():
        train(from_dict(Config, recipe), progress=progress)
    return str(teacher_run / "last.pt")


def run_demo(
    out: Path,
    data: Path | None = None,
    pairs: Path | None = None,
    images: Path | None = None,
    teacher: str | Teacher | None = None,
    epochs: float | None = None,
    setup: SyntheticSetup | None = None,
    progress: bool = True,
) -> str:
    """Run the pipeline on generated faces (no ``data``) or on real ones; return the results table. ``teacher`` is a
    spec or a teacher already built (the command line builds an .onnx teacher with its preprocessing keys)."""
    from facedistill.teachers import Teacher, create_teacher

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if data is None:
        if pairs is not None or teacher is not None:
            raise ValueError("--pairs/--teacher go with --data (real faces); without --data the demo generates all")
        setup = setup or SyntheticSetup()
        train_dir, test_dir = out / "data" / "train", out / "data" / "test"
        if not train_dir.exists():
            write_identity_folders(train_dir, setup.train_identities, setup.images_per_identity)
            write_identity_folders(test_dir, setup.test_identities, setup.test_images, first_identity=10_000)
        pairs = write_pairs_tsv(test_dir, out / "data" / "test_pairs.tsv", pairs_per_fold=setup.pairs_per_fold)
        teacher = _synthetic_teacher(out, train_dir, setup, progress)
        data, images = train_dir, None
        recipe = student_recipe(epochs or setup.student_epochs, setup.batch_size, 128)
    else:
        if pairs is None or teacher is None:
            raise ValueError("with --data also give --pairs (and --images for LFW pairs.txt) and --teacher")
        recipe = student_recipe(epochs or 6.0, 128, 128)
    teacher_model = teacher if isinstance(teacher, Teacher) else create_teacher(teacher)
    recipe["model"]["embedding_size"] = teacher_model.embedding_size
    rows, _ = compare_methods(
        out / "compare", data, teacher_model, pairs, images, student_methods(32.0), recipe, progress=progress
    )
    table = markdown_table(rows, "test")
    print("\n" + table)
    print(f"\nROC curves: {out / 'compare' / 'roc_all.png'}; details: {out / 'compare' / 'results.json'}")
    return table
