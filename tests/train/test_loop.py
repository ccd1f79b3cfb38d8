import gc
import json
import weakref

import pytest
import torch

from facedistill.config import load_config
from facedistill.data.datasets import ImageFolderDataset
from facedistill.teachers.cache import build_teacher_cache
from facedistill.train import loop as loop_module
from facedistill.train.checkpoint import load_checkpoint
from facedistill.train.distributed import Distributed
from facedistill.train.loop import train
from tests.helpers import ProjectionTeacher, make_face_folders


def _config(tmp_path, train_dir, pairs, name, *extra):
    return load_config(
        None,
        [
            f"data.train={train_dir}",
            "method.name=arcface",
            "data.batch_size=8",
            "data.num_workers=0",
            "model.embedding_size=16",
            f"run.output_dir={tmp_path / name}",
            "train.log_every=1",
            "train.amp=none",
            "train.channels_last=false",
            "schedule.warmup_epochs=0",
            "optim.lr=0.05",
            f"eval.tests=[{{name: syn, pairs: {pairs}}}]",
            *extra,
        ],
    )


@pytest.fixture(scope="module")
def faces(tmp_path_factory):
    root = tmp_path_factory.mktemp("faces")
    return make_face_folders(root, identities=4, images=6, test_identities=4)


def test_arcface_run_writes_everything_a_user_expects(tmp_path, faces) -> None:
    train_dir, pairs = faces
    summary = train(
        _config(tmp_path, train_dir, pairs, "arc", "train.epochs=2", f"data.val_pairs={pairs}"),
        progress=False,
    )
    run = tmp_path / "arc"
    for name in [
        "config.yaml",
        "last.pt",
        "model.onnx",
        "results.json",
        "train.csv",
        "val.csv",
        "roc_syn.png",
    ]:
        assert (run / name).exists(), name
    assert list((run / "tensorboard").iterdir())
    results = json.loads((run / "results.json").read_text())
    assert results["steps"] == 6 and results["model"]["params"] > 0
    assert 0.0 <= summary.tests["syn"]["accuracy_mean"] <= 1.0
    assert summary.images_per_second > 0


def test_margin_distillation_loss_falls(tmp_path, faces) -> None:
    train_dir, pairs = faces
    dataset = ImageFolderDataset(train_dir)
    build_teacher_cache(ProjectionTeacher(), dataset, tmp_path / "cache", num_workers=0, progress=False)
    config = _config(
        tmp_path,
        train_dir,
        pairs,
        "md",
        "train.epochs=8",
        "method.name=margin_distillation",
        "method.scale=16.0",
        f"teacher.cache={tmp_path / 'cache'}",
        "train.export_onnx=false",
    )
    train(config, progress=False)
    rows = (tmp_path / "md" / "train.csv").read_text().splitlines()[1:]
    losses = [float(row.split(",")[2]) for row in rows]
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3
    results = json.loads((tmp_path / "md" / "results.json").read_text())
    assert results["centres"] == "mean" and results["teacher_id"] == "projection-16-0"


def test_teacher_and_student_sizes_must_match(tmp_path, faces) -> None:
    train_dir, pairs = faces
    build_teacher_cache(
        ProjectionTeacher(embedding_size=32),
        ImageFolderDataset(train_dir),
        tmp_path / "cache",
        num_workers=0,
        progress=False,
    )
    config = _config(
        tmp_path,
        train_dir,
        pairs,
        "bad",
        "method.name=margin_distillation",
        f"teacher.cache={tmp_path / 'cache'}",
    )
    with pytest.raises(ValueError, match="set model.embedding_size=32"):
        train(config, progress=False)


def test_unwritable_output_directory_fails_before_training(tmp_path, faces) -> None:
    train_dir, pairs = faces
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(OSError, match="cannot write to the run directory"):
        train(_config(tmp_path, train_dir, pairs, "file/run"), progress=False)


def test_identity_balanced_batches_feed_the_loop(tmp_path, faces, monkeypatch) -> None:
    train_dir, pairs = faces
    seen: list[list[int]] = []
    original = loop_module.collate_faces

    def spy(samples):
        batch = original(samples)
        seen.append(batch.labels.tolist())
        return batch

    monkeypatch.setattr(loop_module, "collate_faces", spy)
    config = _config(
        tmp_path,
        train_dir,
        pairs,
        "balanced",
        "data.sampler=identity_balanced",
        "data.images_per_identity=4",
        "train.epochs=1",
        "train.export_onnx=false",
    )
    config.eval.tests = []
    train(config, progress=False)
    assert len(seen) == 3
    for labels in seen:
        assert sorted(labels.count(label) for label in set(labels)) == [4, 4]


def test_pair_based_methods_refuse_random_batches(tmp_path, faces) -> None:
    train_dir, pairs = faces
    for method in ("triplet", "ekd"):
        with pytest.raises(ValueError, match="set data.sampler=identity_balanced"):
            train(_config(tmp_path, train_dir, pairs, method, f"method.name={method}"), progress=False)


def test_decoded_cache_trains_exactly_like_the_image_files(tmp_path, faces) -> None:
    import torch

    train_dir, pairs = faces
    common = ["train.max_steps=2", "train.export_onnx=false", "eval.tests=[]"]
    train(_config(tmp_path, train_dir, pairs, "files", *common), progress=False)
    train(_config(tmp_path, train_dir, pairs, "cached", *common, f"data.decoded_cache={tmp_path / 'dec'}"), False)
    assert (tmp_path / "dec" / "manifest.json").exists()
    files = torch.load(tmp_path / "files" / "last.pt", weights_only=True)["model"]
    cached = torch.load(tmp_path / "cached" / "last.pt", weights_only=True)["model"]
    for key, value in files.items():
        assert torch.equal(value, cached[key]), key


def test_a_failed_run_lets_go_of_its_model_before_the_process_group_is_destroyed(tmp_path, faces, monkeypatch) -> None:
    """DDP's reducer and sharded heads hold the process group, and gloo aborts the process when one outlives it:
    ``train`` destroys the group only after a run that raised has released them (its frames' locals cleared)."""
    train_dir, pairs = faces
    model: list[weakref.ref] = []
    alive_at_close: list[bool] = []

    class RecordingGroup(Distributed):
        def close(self) -> None:
            gc.collect()  # as the real close does before destroying the group
            alive_at_close.append(model[0]() is not None)

    def fail_in_the_first_epoch(run) -> None:
        model.append(weakref.ref(run.model))
        raise RuntimeError("a rank failed mid-epoch")

    monkeypatch.setattr(loop_module, "init_distributed", lambda device: (RecordingGroup(owns_group=True), device))
    monkeypatch.setattr(loop_module, "train_epoch", fail_in_the_first_epoch)
    with pytest.raises(RuntimeError, match="a rank failed mid-epoch"):
        train(_config(tmp_path, train_dir, pairs, "failed", "train.max_steps=2"), progress=False)
    assert alive_at_close == [False]


def test_resume_reads_the_checkpoint_on_the_host_whatever_device_the_run_trains_on(tmp_path, faces) -> None:
    """On CUDA, a checkpoint loaded onto the run's device brings the CPU RNG state and AdamW's step counters to the
    GPU, and ``torch.set_rng_state`` refuses a non-CPU state. A run whose device stands for an accelerator ("meta":
    nothing on it can be read back) must still restore: the checkpoint is read on the host."""
    train_dir, pairs = faces
    settings = ("train.max_steps=2", "optim.name=adamw", "optim.lr=0.001")
    config = _config(tmp_path, train_dir, pairs, "resumed", *settings)
    train(config, progress=False)
    run = loop_module.set_up(config, Distributed(), torch.device("cpu"))
    run.device = torch.device("meta")  # where load_checkpoint(..., run.device) would put every tensor on a GPU
    loop_module.restore(run)
    saved = load_checkpoint(tmp_path / "resumed" / "last.pt")
    assert run.step == 2 and torch.equal(torch.get_rng_state(), saved["rng"])
    for key, value in saved["model"].items():
        assert torch.equal(run.model.state_dict()[key], value), key
    steps = [state["step"] for state in run.optimizer.state_dict()["state"].values()]
    assert steps and all(step.device.type == "cpu" and int(step) == 2 for step in steps)
