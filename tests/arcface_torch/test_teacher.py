"""The teacher a recipe names: an arcface_torch run directory's network is read from its model.pt."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from easydict import EasyDict as edict

from facedistill.arcface_torch.recipe import RecipeError
from facedistill.arcface_torch.teacher import create_recipe_teacher, recipe_teacher_id, run_network
from facedistill.models import create_model


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
