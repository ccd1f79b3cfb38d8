import json

import onnx
import pytest
from typer.testing import CliRunner

from facedistill.cli import app, method_override, parse_method_variant
from facedistill.config import load_config
from facedistill.demo import SyntheticSetup, run_demo
from tests.helpers import make_face_folders

runner = CliRunner()


def test_info_prints_params_and_macs() -> None:
    result = runner.invoke(app, ["info", "mobilefacenet", "--embedding-size", "128"])
    assert result.exit_code == 0, result.output
    assert "params 1.00 M" in result.output and "MACs 0.22 G" in result.output
    bad = runner.invoke(app, ["info", "resnet9000"])
    assert bad.exit_code == 2 and "known:" in bad.output


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    train_dir, pairs = make_face_folders(root, identities=3, images=4, test_identities=3)
    run = root / "run"
    result = runner.invoke(
        app,
        [
            "train",
            "--set",
            f"data.train={train_dir}",
            "--set",
            "data.batch_size=6",
            "--set",
            "data.num_workers=0",
            "--set",
            "model.embedding_size=16",
            "--set",
            "train.epochs=1",
            "--set",
            f"run.output_dir={run}",
            "--set",
            "train.amp=none",
        ],
    )
    assert result.exit_code == 0, result.output
    return run, pairs


def test_eval_export_and_pack_from_the_command_line(trained, tmp_path) -> None:
    run, pairs = trained
    result = runner.invoke(
        app, ["eval", str(run / "last.pt"), "--pairs", str(pairs), "--out", str(tmp_path), "--workers", "0"]
    )
    assert result.exit_code == 0, result.output
    assert "accuracy" in result.output and (tmp_path / "roc_pairs.png").exists()
    assert json.loads((tmp_path / "eval_pairs.json").read_text())["num_pairs"] == 60

    result = runner.invoke(app, ["export", str(run / "last.pt"), "-o", str(tmp_path / "m.onnx")])
    assert result.exit_code == 0, result.output
    metadata = {p.key: p.value for p in onnx.load(str(tmp_path / "m.onnx")).metadata_props}
    assert "(x-127.5)/127.5" in metadata["facedistill.input"].replace(" ", "")

    result = runner.invoke(app, ["pack", str(pairs.parent / "train"), str(tmp_path / "rec")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "rec" / "train.rec").exists() and (tmp_path / "rec" / "property").exists()


def test_cli_errors_are_one_clear_line(tmp_path) -> None:
    result = runner.invoke(app, ["train", "--set", "train.epoch=3"])
    assert result.exit_code == 2 and "unknown key(s) epoch" in result.output
    result = runner.invoke(app, ["eval", str(tmp_path / "nope.pt"), "--pairs", str(tmp_path / "p.tsv")])
    assert result.exit_code == 2 and "nope.pt does not exist" in result.output


def test_demo_runs_the_whole_pipeline_on_generated_faces(tmp_path, monkeypatch) -> None:
    setup = SyntheticSetup(
        train_identities=5,
        images_per_identity=4,
        test_identities=4,
        test_images=3,
        pairs_per_fold=2,
        batch_size=10,
        teacher_epochs=2,
        student_epochs=1,
    )
    table = run_demo(tmp_path, setup=setup, progress=False)
    for row in ("| teacher |", "| arcface |", "| margin_distillation |"):
        assert row in table
    compare = tmp_path / "compare"
    assert (compare / "roc_all.png").exists() and (compare / "results.md").exists()
    report = json.loads((compare / "results.json").read_text())
    assert set(report["students"]) == {"arcface", "margin_distillation"}
    # The demo's teacher is a facedistill ArcFace checkpoint of the same identities: its head gives the centres.
    student = json.loads((compare / "margin_distillation" / "results.json").read_text())
    assert student["centres"] == "head"
    assert (compare / "margin_distillation" / "model.onnx").exists()

    # Running it again resumes: finished students and the teacher's test result are reused, nothing retrains.
    def no_training(*args, **kwargs):
        raise AssertionError("a finished student was trained again")

    monkeypatch.setattr("facedistill.pipeline.train", no_training)
    monkeypatch.setattr("facedistill.pipeline.evaluate_pairs", no_training)
    assert run_demo(tmp_path, setup=setup, progress=False) == table


def test_method_variants_parse_into_their_own_hyper_parameters() -> None:
    assert parse_method_variant("kd") == ("kd", {})
    name, options = parse_method_variant("margin_distillation:embedding_weight=1,clamp=false,normaliser=batch")
    assert name == "margin_distillation"
    assert options == {"embedding_weight": 1, "clamp": False, "normaliser": "batch"}
    with pytest.raises(ValueError, match="expected NAME:key=value"):
        parse_method_variant("kd:temperature")


def test_align_lists_faceless_images_and_centre_crops_them(tmp_path) -> None:
    import cv2
    import numpy as np

    (tmp_path / "raw" / "person").mkdir(parents=True)
    cv2.imwrite(str(tmp_path / "raw" / "person" / "grey.jpg"), np.full((160, 120, 3), 128, np.uint8))
    result = runner.invoke(
        app, ["align", str(tmp_path / "raw"), str(tmp_path / "out"), "--workers", "1", "--no-face", "center_crop"]
    )
    assert result.exit_code == 0, result.output
    report = (tmp_path / "out" / "align_report.tsv").read_text()
    assert "person/grey.jpg" in report and "center_crop" in report
    assert cv2.imread(str(tmp_path / "out" / "person" / "grey.jpg")).shape == (112, 112, 3)


def test_export_int8_and_latency_from_the_command_line(trained, tmp_path) -> None:
    run, _ = trained
    assert (run / "report.md").exists()
    result = runner.invoke(app, ["export", str(run / "last.pt"), "-o", str(tmp_path / "m.onnx"), "--int8"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "m.int8.onnx").exists() and "integer ops" in result.output
    args = ["latency", str(run / "last.pt"), "--threads", "1", "-b", "1", "-b", "2", "--repeats", "1", "--rounds", "1"]
    result = runner.invoke(app, [*args, "--out", str(tmp_path / "lat.json")])
    assert result.exit_code == 0, result.output
    assert "| ORT int8 (dynamic) |" in result.output
    assert len(json.loads((tmp_path / "lat.json").read_text())) == 3


def test_distill_keeps_the_configs_method_unless_told_otherwise(tmp_path) -> None:
    recipe = tmp_path / "kd.yaml"
    recipe.write_text("method: {name: kd, temperature: 2.0}\n")
    assert method_override(None, recipe, []) == []
    assert method_override("rkd", recipe, []) == ["method.name=rkd"]
    assert method_override(None, recipe, ["method.name=ekd"]) == []
    plain = tmp_path / "plain.yaml"
    plain.write_text("train: {epochs: 2}\n")
    assert method_override(None, plain, []) == ["method.name=margin_distillation"]
    assert method_override(None, None, []) == ["method.name=margin_distillation"]
    assert load_config(recipe, method_override(None, recipe, [])).method == {"name": "kd", "temperature": 2.0}
