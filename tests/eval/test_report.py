"""Run report: written from a run directory's files, with notes instead of errors for what is missing."""

from __future__ import annotations

import json

import numpy as np
import yaml
from PIL import Image

from facedistill.data.synthetic import write_identity_folders
from facedistill.eval.metrics import verification_metrics
from facedistill.eval.report import write_run_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _fake_run(tmp_path):
    train = write_identity_folders(tmp_path / "faces", identities=5, images_per_identity=2)
    run = tmp_path / "run"
    run.mkdir()
    config = {
        "run": {"output_dir": str(run)},
        "data": {"train": str(train)},
        "model": {"name": "mobilefacenet", "embedding_size": 128},
        "method": {"name": "margin_distillation"},
    }
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    rng = np.random.default_rng(0)
    issame = np.repeat([True, False], 100)
    scores = np.where(issame, rng.normal(0.6, 0.2, 200), rng.normal(0.1, 0.2, 200))
    result = verification_metrics(scores, issame)
    results = {
        "steps": 30,
        "epochs": 3.0,
        "train_seconds": 12.5,
        "images_per_second": 40.0,
        "selected": "last.pt",
        "validation": {"accuracy": 0.9, "std": 0.01, "step": 30},
        "tests": {"lfw": result.to_dict()},
        "model": {"name": "mobilefacenet", "embedding_size": 128, "params": 1_000_000, "macs": 230_000_000},
    }
    (run / "results.json").write_text(json.dumps(results))
    rows = ["step,arcface,loss,lr,images_per_second,epoch"]
    rows += [f"{s},{5 - s / 10},{5 - s / 10},{0.1 * (1 - s / 40)},40.0,{s / 10}" for s in (10, 20, 30)]
    rows.append("20,3.1,3.1,0.05,40.0,2.0")  # a resumed run logs some steps twice
    (run / "train.csv").write_text("\n".join(rows) + "\n")
    (run / "val.csv").write_text("step,accuracy,std\n10,0.7,0.02\n30,0.9,0.01\n")
    (run / "roc_lfw.png").write_bytes(PNG_MAGIC)
    return run, result


def test_full_report(tmp_path):
    run, result = _fake_run(tmp_path)
    path = write_run_report(run, sample_identities=4)
    assert path == run / "report.md"
    text = path.read_text()
    assert f"{100 * result.accuracy_mean:.2f} +- {100 * result.accuracy_std:.2f}" in text
    assert "TAR@FAR=0.001" in text
    assert "1.00 M" in text and "0.23 G" in text
    assert "![training curves](training_curves.png)" in text
    assert "![roc_lfw](roc_lfw.png)" in text
    assert "![training samples](sample_grid.png)" in text
    assert "Best validation accuracy 90.00 % at step 30" in text
    assert "## Notes" not in text
    for name in ("training_curves.png", "sample_grid.png"):
        assert (run / name).read_bytes()[:8] == PNG_MAGIC
    with Image.open(run / "sample_grid.png") as grid:
        # 4 identities -> 2 x 2 tiles of 112 px with 2 px gaps.
        assert grid.size == (2 * 114 + 2, 2 * 114 + 2)
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]


def test_missing_pieces_become_notes(tmp_path):
    run = tmp_path / "empty_run"
    run.mkdir()
    text = write_run_report(run).read_text()
    assert "## Notes" in text
    assert "config.yaml" in text and "results.json" in text and "train.csv" in text
    assert not (run / "training_curves.png").exists()
    assert not (run / "sample_grid.png").exists()

    (run / "config.yaml").write_text(
        yaml.safe_dump({"data": {"train": str(tmp_path / "gone")}, "model": {"name": "nope"}})
    )
    (run / "train.csv").write_text("step,loss,lr\n")
    text = write_run_report(run).read_text()
    assert "not found" in text and "gone" in text
    assert "train.csv` has no rows" in text
    assert "params/MACs could not be computed" in text
