import json
import re

import onnx
import pytest
import torch
from typer.testing import CliRunner

from facedistill.cli import KNOWN_METHODS, app, parse_method_variant
from facedistill.demo import SyntheticSetup, run_demo
from facedistill.distill import METHODS
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
            "method.name=arcface",
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
    saved = json.loads((tmp_path / "eval_pairs.json").read_text())
    assert saved["num_pairs"] == 60
    # 60 pairs cannot estimate TAR@FAR=1e-3: the tables' "-" and one line saying why, not "n/a".
    assert "TAR@FAR=0.001: -" in result.output and "n/a" not in result.output
    assert f"TAR@FAR=0.001 needs at least 1,000 impostor pairs; this set has {saved['num_impostor']}." in result.output

    result = runner.invoke(app, ["export", str(run / "last.pt"), "-o", str(tmp_path / "m.onnx")])
    assert result.exit_code == 0, result.output
    metadata = {p.key: p.value for p in onnx.load(str(tmp_path / "m.onnx")).metadata_props}
    assert "(x-127.5)/127.5" in metadata["facedistill.input"].replace(" ", "")

    result = runner.invoke(app, ["pack", str(pairs.parent / "train"), str(tmp_path / "rec")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "rec" / "train.rec").exists() and (tmp_path / "rec" / "property").exists()


@pytest.fixture(scope="module")
def calibrated(trained, tmp_path_factory):
    """The trained student's checkpoint with its BatchNorm statistics measured on its training faces.

    Two steps leave them at their initial values, where every embedding is nearly the same vector (pair cosines
    all 1.0000): the pairs' order then rests on the 7th digit, and a 2e-8 difference between onnxruntime and PyTorch
    changes the AUC. The statistics a longer run would have reached make the comparison mean something, at no
    training cost."""
    from facedistill.data.datasets import open_training_set
    from facedistill.data.images import normalise
    from facedistill.train.checkpoint import load_checkpoint, load_student

    run, pairs = trained
    state = load_checkpoint(run / "last.pt")
    student, _ = load_student(run / "last.pt")
    faces = open_training_set(pairs.parent / "train")
    images = torch.stack([faces[index][0] for index in range(len(faces))])
    norms = [module for module in student.modules() if isinstance(module, torch.nn.modules.batchnorm._BatchNorm)]
    for module in norms:
        module.reset_running_stats()
        module.momentum = None  # a plain average over the one pass
    with torch.no_grad():
        student.train()(normalise(images).contiguous(memory_format=torch.channels_last))
    for module in norms:
        module.momentum = 0.1
    state["model"] = {key: value.contiguous() for key, value in student.eval().state_dict().items()}
    path = tmp_path_factory.mktemp("calibrated") / "calibrated.pt"
    torch.save(state, path)
    return path


@pytest.fixture(scope="module")
def exported(calibrated, tmp_path_factory):
    """The student exported by the command line, and the same graph without facedistill's metadata (a foreign ONNX,
    which does not say how its input is normalised)."""
    folder = tmp_path_factory.mktemp("exported")
    result = runner.invoke(app, ["export", str(calibrated), "-o", str(folder / "model.onnx")])
    assert result.exit_code == 0, result.output
    model = onnx.load(str(folder / "model.onnx"))
    del model.metadata_props[:]
    onnx.save(model, str(folder / "foreign.onnx"))
    return folder / "model.onnx", folder / "foreign.onnx"


def _eval_result(args: list[str], out) -> dict:
    result = runner.invoke(app, ["eval", *args, "--workers", "0", "--out", str(out)])
    assert result.exit_code == 0, result.output
    return json.loads((out / "eval_pairs.json").read_text())


def test_eval_of_an_exported_student_as_an_onnx_teacher_gives_its_checkpoints_accuracy(
    trained, calibrated, exported, tmp_path
) -> None:
    _, pairs = trained
    model, foreign = exported
    checkpoint = _eval_result([str(calibrated), "--pairs", str(pairs)], tmp_path / "checkpoint")
    # The exported file says how its input is normalised: nothing else to give.
    onnx_teacher = _eval_result(["--teacher", str(model), "--pairs", str(pairs)], tmp_path / "onnx")
    # A file that does not say takes the same three facts from the command line.
    keys = ["--teacher-colour-order", "RGB", "--teacher-mean", "127.5", "--teacher-std", "127.5,127.5,127.5"]
    given = _eval_result(["--teacher", str(foreign), *keys, "--pairs", str(pairs)], tmp_path / "given")
    print(
        f"accuracy checkpoint {checkpoint['accuracy_mean']:.6f}, onnx teacher {onnx_teacher['accuracy_mean']:.6f}, "
        f"foreign + keys {given['accuracy_mean']:.6f}; auc {checkpoint['auc']:.6f} {onnx_teacher['auc']:.6f} "
        f"{given['auc']:.6f}"
    )
    for other in (onnx_teacher, given):
        assert other["num_pairs"] == checkpoint["num_pairs"] == 60
        assert other["accuracy_mean"] == pytest.approx(checkpoint["accuracy_mean"], abs=1e-4)
        assert other["fold_accuracies"] == pytest.approx(checkpoint["fold_accuracies"], abs=1e-4)
        assert other["auc"] == pytest.approx(checkpoint["auc"], abs=1e-4)


def test_an_onnx_teacher_without_its_preprocessing_is_refused_in_one_line(trained, exported, tmp_path) -> None:
    run, pairs = trained
    model, foreign = exported
    for command in (
        ["eval", "--teacher", str(foreign), "--pairs", str(pairs)],
        ["cache-teacher", "--teacher", str(foreign), "--data", str(pairs.parent / "train"), "-o", str(tmp_path / "c")],
    ):
        result = runner.invoke(app, command)
        assert result.exit_code == 2, result.output
        line = _one_error_line(result.output)
        assert line.startswith(f"error: {foreign} needs preprocessing"), line
        assert "set --teacher-colour-order, --teacher-mean and --teacher-std" in line
    assert not (tmp_path / "c").exists()

    result = runner.invoke(app, ["eval", "--teacher", str(model), "--teacher-mean", "0", "--pairs", str(pairs)])
    assert result.exit_code == 2, result.output
    line = _one_error_line(result.output)
    assert "--teacher-mean = 0 contradicts the model's metadata facedistill.mean = 127.5" in line

    for args, message in [
        (["--teacher", "sface", "--teacher-std", "1"], "error: --teacher-std applies to an .onnx teacher only"),
        ([str(run / "last.pt"), "--teacher-mean", "1"], "error: --teacher-mean goes with --teacher"),
        (["--teacher", str(foreign), "--teacher-mean", "1,2"], "error: --teacher-mean must be a number or three"),
    ]:
        result = runner.invoke(app, ["eval", *args, "--pairs", str(pairs)])
        assert result.exit_code == 2, result.output
        assert _one_error_line(result.output).startswith(message), result.output


def test_cache_teacher_takes_the_preprocessing_keys(trained, exported, tmp_path) -> None:
    _, pairs = trained
    _, foreign = exported
    keys = ["--teacher-colour-order", "BGR", "--teacher-mean", "127.5", "--teacher-std", "128"]
    args = ["--data", str(pairs.parent / "train"), "-o", str(tmp_path / "cache"), "--workers", "0"]
    result = runner.invoke(app, ["cache-teacher", "--teacher", str(foreign), *keys, *args])
    assert result.exit_code == 0, result.output
    assert "-BGR_mean127.5_std128 in" in result.output

    # distill builds the same teacher from the same keys (teacher.colour_order, .mean, .std) to check the cache's id.
    distill = [
        "distill",
        *("--data", str(pairs.parent / "train"), "--cache", str(tmp_path / "cache"), "--teacher", str(foreign)),
        *("-o", str(tmp_path / "run"), "--set", "model.embedding_size=16", "--set", "data.batch_size=6"),
        *("--set", "data.num_workers=0", "--set", "train.max_steps=1", "--set", "train.amp=none"),
        *("--set", "train.export_onnx=false"),
    ]
    result = runner.invoke(app, [*distill, *keys[:2], "--teacher-mean", "0", "--teacher-std", "128"])
    assert result.exit_code == 2, result.output
    assert "-BGR_mean0_std128" in _one_error_line(result.output)
    result = runner.invoke(app, [*distill, *keys])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "run" / "results.json").read_text())["steps"] == 1


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


class _Summary:
    def to_dict(self) -> dict:
        return {}


@pytest.fixture
def run_configs(monkeypatch) -> list:
    """The configs the commands would train with: the training loop itself is replaced by a recorder."""
    configs: list = []

    def record(config, resume=False, **kwargs):
        configs.append(config)
        return _Summary()

    monkeypatch.setattr("facedistill.train.loop.train", record)
    return configs


def _one_error_line(output: str) -> str:
    lines = output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), output
    return lines[0]


def test_distill_keeps_the_configs_method_unless_told_otherwise(tmp_path, run_configs) -> None:
    recipe = tmp_path / "kd.yaml"
    recipe.write_text("method: {name: kd, temperature: 2.0}\n")
    plain = tmp_path / "plain.yaml"
    plain.write_text("train: {epochs: 2}\n")
    flags = ["distill", "--data", str(tmp_path / "faces"), "--cache", str(tmp_path / "cache")]
    cases = [
        (["--config", str(recipe)], {"name": "kd", "temperature": 2.0}),
        (
            ["--config", str(recipe), "--method", "margin_distillation"],
            {"name": "margin_distillation", "temperature": 2.0},
        ),
        (["--config", str(recipe), "--set", "method.name=gkd"], {"name": "gkd", "temperature": 2.0}),
        (["--config", str(plain)], {"name": "margin_distillation"}),
        ([], {"name": "margin_distillation"}),
        (["--set", "method.scale=16"], {"name": "margin_distillation", "scale": 16}),
        (["-m", "kd"], {"name": "kd"}),
    ]
    for args, method in cases:
        result = runner.invoke(app, [*flags, *args])
        assert result.exit_code == 0, (args, result.output)
        assert run_configs[-1].method == method, args
        assert run_configs[-1].train.epochs == (2.0 if str(plain) in args else 10.0)


def test_distill_passes_the_teacher_preprocessing_keys_to_the_config(tmp_path, run_configs) -> None:
    flags = ["distill", "--data", str(tmp_path / "faces"), "--cache", str(tmp_path / "cache")]
    keys = ["--teacher-colour-order", "BGR", "--teacher-mean", "1,2,3", "--teacher-std", "64"]
    result = runner.invoke(app, [*flags, "--teacher", str(tmp_path / "t.onnx"), *keys])
    assert result.exit_code == 0, result.output
    teacher = run_configs[-1].teacher
    assert (teacher.colour_order, teacher.mean, teacher.std) == ("BGR", (1.0, 2.0, 3.0), 64.0)
    result = runner.invoke(app, [*flags, "--teacher", "sface", "--teacher-mean", "1"])
    assert result.exit_code == 2
    assert _one_error_line(result.output).startswith("error: teacher.mean applies to an .onnx teacher only")


def test_distill_refuses_an_unknown_method_in_one_line_before_anything_runs(tmp_path) -> None:
    run = tmp_path / "run"
    result = runner.invoke(app, ["distill", "--method", "foo", "--data", str(tmp_path / "faces"), "-o", str(run)])
    assert result.exit_code == 2
    line = _one_error_line(result.output)
    assert line.startswith("error: method.name: unknown method 'foo'; known: ")
    assert line.split("known: ")[1].split(", ") == METHODS.names()
    assert not run.exists()


def test_train_without_a_method_name_says_to_set_it(tmp_path) -> None:
    recipe = tmp_path / "nameless.yaml"
    recipe.write_text(f"data: {{train: {tmp_path / 'faces'}}}\nrun: {{output_dir: {tmp_path / 'run'}}}\n")
    result = runner.invoke(app, ["train", str(recipe)])
    assert result.exit_code == 2
    line = _one_error_line(result.output)
    assert "set method.name" in line and all(name in line for name in METHODS.names())
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("method.foo=1", "method: unknown key(s) foo; allowed: "),
        ("method.temperature=0", "method.temperature must be > 0"),
        ("method.normaliser=global", "method.normaliser: 'global' is not one of 'batch', 'local_batch', 'dataset'"),
    ],
)
def test_bad_hyper_parameters_fail_when_the_config_is_built(tmp_path, setting, message) -> None:
    missing = tmp_path / "no-such-faces"  # read first, were the method not checked before the data
    args = ["distill", "--data", str(missing), "--cache", str(tmp_path / "cache"), "-o", str(tmp_path / "run")]
    result = runner.invoke(app, [*args, "--set", setting])
    assert result.exit_code == 2
    assert _one_error_line(result.output).startswith(f"error: {message}")
    assert "no-such-faces" not in result.output and not (tmp_path / "run").exists()


def test_compare_checks_every_student_before_the_teacher_runs(tmp_path, monkeypatch) -> None:
    def no_teacher(spec):
        raise AssertionError("the teacher was loaded before the methods were checked")

    monkeypatch.setattr("facedistill.teachers.create_teacher", no_teacher)
    base = ["compare", "--data", str(tmp_path / "faces"), "--teacher", "sface", "--pairs", str(tmp_path / "p.tsv")]
    for entry, message in [
        ("foo", "error: --methods foo: method.name: unknown method 'foo'; known: adadistill, "),
        ("kd:temperature=0", "error: --methods kd:temperature=0: method.temperature must be > 0"),
        ("triplet", "error: --methods triplet: method 'triplet' compares images of the same identity"),
    ]:
        result = runner.invoke(app, [*base, "-m", "arcface", "-m", entry, "-o", str(tmp_path / "out")])
        assert result.exit_code == 2
        assert _one_error_line(result.output).startswith(message)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["distill", "compare"])
def test_help_lists_every_registered_method(command) -> None:
    result = runner.invoke(app, [command, "--help"])
    assert result.exit_code == 0, result.output
    words = set(re.findall(r"[a-z_]+", result.output))
    assert set(METHODS.names()) <= words and len(METHODS.names()) >= 11
    assert KNOWN_METHODS not in result.output
