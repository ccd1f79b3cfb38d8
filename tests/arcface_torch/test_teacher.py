"""The teacher a recipe names: an arcface_torch run directory's network is read from its model.pt; an .onnx model's
preprocessing from its facedistill metadata, else from config.teacher_colour_order, teacher_mean, teacher_std."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from easydict import EasyDict as edict

from facedistill.arcface_torch.recipe import PLUGIN_KEYS, RecipeError, validate
from facedistill.arcface_torch.teacher import create_recipe_teacher, recipe_teacher_id, run_network
from facedistill.export.onnx import export_onnx
from facedistill.models import create_model
from facedistill.teachers import Preprocessing


def _run_dir(tmp_path: Path, backbone: str, embedding_size: int, wrapped: bool = False) -> Path:
    run = tmp_path / f"run_{backbone}"
    run.mkdir()
    state = create_model(backbone, embedding_size=embedding_size).state_dict()
    if wrapped:  # saved from a DistributedDataParallel module
        state = {f"module.{key}": value for key, value in state.items()}
    torch.save(state, run / "model.pt")
    return run


@pytest.mark.parametrize(("backbone", "network"), [("mbf", "mbf"), ("iresnet18", "r18")])
def test_the_network_is_read_from_model_pt(tmp_path: Path, backbone: str, network: str) -> None:
    run = _run_dir(tmp_path, backbone, 128, wrapped=backbone == "iresnet18")
    assert run_network(edict(teacher=str(run))) == (network, 128)
    teacher = create_recipe_teacher(edict(teacher=str(run)))
    assert teacher.embedding_size == 128
    assert teacher.embed(torch.zeros(2, 3, 112, 112, dtype=torch.uint8)).shape == (2, 128)
    # The cache's teacher id does not depend on whether the recipe names the network.
    assert recipe_teacher_id(edict(teacher=str(run))) == teacher.teacher_id
    assert recipe_teacher_id(edict(teacher=str(run), teacher_network=network)) == teacher.teacher_id


def test_the_threads_asked_for_reach_an_onnx_teacher_and_torchs_stay_the_callers(tmp_path: Path) -> None:
    student = create_model("mobilefacenet", embedding_size=128)
    path = export_onnx(student, tmp_path / "student.onnx", exporter="torchscript").path
    teacher = create_recipe_teacher(edict(teacher=str(path)), threads=1)
    assert teacher.intra_op_threads == 1
    # A run directory's torch network takes no thread count: it is built as without one.
    run = _run_dir(tmp_path, "mbf", 128)
    assert create_recipe_teacher(edict(teacher=str(run)), threads=1).embedding_size == 128


def test_a_wrong_teacher_network_is_refused_naming_the_right_one(tmp_path: Path) -> None:
    run = _run_dir(tmp_path, "mbf", 128)
    cfg = edict(teacher=str(run), teacher_network="r50")
    message = r"model.pt looks like mbf, config.teacher_network = 'r50'; set config.teacher_network = 'mbf'"
    for call in (run_network, create_recipe_teacher, recipe_teacher_id):
        with pytest.raises(RecipeError, match=message):
            call(cfg)


def test_a_model_pt_of_no_known_network_is_refused(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    torch.save({"conv.weight": torch.zeros(3, 3)}, run / "model.pt")
    with pytest.raises(RecipeError, match=r"not a backbone state_dict of any arcface_torch network .*r18, r34"):
        run_network(edict(teacher=str(run)))
    (run / "model.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(RecipeError, match=r"model.pt cannot be loaded"):
        run_network(edict(teacher=str(run)))


class _Pooled(torch.nn.Module):
    """A tiny 112x112 embedder, cheap to export and to run."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(3 * 4 * 4, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.nn.functional.adaptive_avg_pool2d(x, 4).flatten(1))


@pytest.fixture(scope="module")
def onnx_models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(a model facedistill exported, with its preprocessing in its metadata; the same graph without metadata, as
    arcface_torch's torch2onnx.py writes one)."""
    import onnx

    folder = tmp_path_factory.mktemp("onnx_teachers")
    torch.manual_seed(0)
    exported = export_onnx(_Pooled(), folder / "student.onnx", exporter="torchscript").path
    model = onnx.load(str(exported))
    del model.metadata_props[:]
    foreign = folder / "foreign.onnx"
    onnx.save(model, str(foreign))
    return exported, foreign


def _onnx_recipe(path: Path, **keys: object) -> edict:
    return edict(loss="margin_distillation", teacher=str(path), rec="data/x", **keys)


def test_an_onnx_teacher_takes_its_preprocessing_from_facedistill_metadata_else_from_the_recipe(
    onnx_models: tuple[Path, Path],
) -> None:
    exported, foreign = onnx_models
    teacher = create_recipe_teacher(_onnx_recipe(exported))
    assert teacher.preprocessing == Preprocessing("RGB", 127.5, 127.5)
    assert recipe_teacher_id(_onnx_recipe(exported)) == teacher.teacher_id
    keys = dict(teacher_colour_order="BGR", teacher_mean=[0.5, 1.0, 2.0], teacher_std=64)
    cfg = validate(_onnx_recipe(foreign, **keys))
    teacher = create_recipe_teacher(cfg)
    assert teacher.preprocessing == Preprocessing("BGR", (0.5, 1.0, 2.0), 64.0)
    assert recipe_teacher_id(cfg) == teacher.teacher_id
    assert teacher.embed(torch.zeros(2, 3, 112, 112, dtype=torch.uint8)).shape == (2, 8)
    # They are the recipe's own keys, as the _md twins' test reads them.
    assert {"teacher_colour_order", "teacher_mean", "teacher_std"} <= set(PLUGIN_KEYS)


def test_recipe_keys_that_contradict_the_onnx_metadata_are_refused_naming_both(
    onnx_models: tuple[Path, Path],
) -> None:
    exported, _ = onnx_models
    cfg = _onnx_recipe(exported, teacher_std=1.0)
    for call in (create_recipe_teacher, recipe_teacher_id):
        with pytest.raises(RecipeError) as info:
            call(cfg)
        message = str(info.value)
        assert "config.teacher_std = 1 contradicts the model's metadata facedistill.std = 127.5" in message
        assert "\n" not in message


def test_an_onnx_teacher_that_does_not_say_its_preprocessing_is_refused_naming_the_recipe_keys(
    onnx_models: tuple[Path, Path],
) -> None:
    _, foreign = onnx_models
    with pytest.raises(RecipeError) as info:
        create_recipe_teacher(_onnx_recipe(foreign, teacher_mean=127.5))
    message = str(info.value)
    assert message.startswith(f"{foreign} needs preprocessing")
    assert "set config.teacher_colour_order and config.teacher_std" in message
    assert "\n" not in message


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        (dict(teacher_colour_order="rgb"), "config.teacher_colour_order must be RGB or BGR, got 'rgb'"),
        (dict(teacher_mean="127.5"), "config.teacher_mean must be a number or three numbers, got '127.5'"),
        (dict(teacher_std=(1, 2)), "config.teacher_std must be a number or three numbers, got (1, 2)"),
    ],
)
def test_bad_preprocessing_keys_are_refused_when_the_recipe_loads(keys: dict, message: str) -> None:
    with pytest.raises(RecipeError, match=re.escape(message)):
        validate(_onnx_recipe(Path("teacher.onnx"), **keys))


def test_preprocessing_keys_are_refused_for_teachers_that_are_not_onnx(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match=r"config.teacher_mean applies to an \.onnx teacher only"):
        validate(edict(loss="margin_distillation", teacher="sface", rec="data/x", teacher_mean=127.5))
    run = _run_dir(tmp_path, "mbf", 128)
    with pytest.raises(RecipeError, match=r"config.teacher_colour_order applies to an \.onnx teacher only"):
        create_recipe_teacher(edict(teacher=str(run), teacher_colour_order="RGB"))
    with pytest.raises(RecipeError, match="config.teacher_std is set but config.loss selects no facedistill method"):
        validate(edict(loss=None, rec="data/x", teacher_std=1.0))
