"""Recipe mistakes the patched ``train_v2.py`` and ``cache-teacher`` catch before any training data is read: one
``error:`` line from rank 0 under torchrun (issue 41, items 4 and 5), or one warning where the run can go on."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.arcface_torch.helpers import run, torchrun
from tests.arcface_torch.test_refusals import _assert_one_refusal, _child_lines, _variant

CACHE_TEACHER = ("-m", "facedistill.cli", "arcface-torch", "cache-teacher")


def _train(root: Path, recipe: str, nproc: int = 1) -> object:
    return run(torchrun(nproc, "train_v2.py", recipe), cwd=root, check=False)


def _cache(root: Path, recipe: str, nproc: int = 1, check: bool = False) -> object:
    return run(torchrun(nproc, *CACHE_TEACHER, recipe), cwd=root, check=check)


# ------------------------------------------------------------------------------- the framework's own ArcFace path


def test_a_wrong_num_classes_on_the_arcface_path_is_one_line(patched_checkout: Path) -> None:
    recipe = _variant(patched_checkout, "tiny_classes7", "tiny", "config.num_classes = 7\n")
    _assert_one_refusal(_train(patched_checkout, recipe, 2), "config.num_classes = 7", "data/tiny holds 6 identities")
    assert not (patched_checkout / "work_dirs" / "tiny_classes7" / "model.pt").exists()


def test_a_wrong_num_image_is_refused_naming_the_records_and_the_schedule(patched_checkout: Path) -> None:
    recipe = _variant(patched_checkout, "tiny_images", "tiny", "config.num_image = 5000\n")
    line = _assert_one_refusal(_train(patched_checkout, recipe), "config.num_image = 5000", "138 images")
    assert "learning-rate schedule" in line and "config.num_image = 138" in line


def test_dali_without_nvidia_dali_or_a_gpu_is_one_line(patched_checkout: Path) -> None:
    recipe = _variant(patched_checkout, "tiny_dali", "tiny", "config.dali = True\n")
    line = _assert_one_refusal(_train(patched_checkout, recipe), "config.dali = True", "NVIDIA DALI")
    assert "config.dali = False" in line
    # Refused when the recipe loads: the run did not even make its work dir.
    assert not (patched_checkout / "work_dirs" / "tiny_dali").exists()


def test_a_misspelled_config_name_names_the_path_and_the_nearby_configs(patched_checkout: Path) -> None:
    line = _assert_one_refusal(_train(patched_checkout, "configs/tiny_mdd"), "configs/tiny_mdd.py")
    assert "configs/tiny_md" in line.split("configs/tiny_mdd.py", 1)[1], line
    _assert_one_refusal(_train(patched_checkout, "configs/nope"), "configs/nope.py", "configs/")


def test_sample_rate_in_config_and_in_loss_params_is_refused_naming_both(patched_checkout: Path) -> None:
    extra = 'config.sample_rate = 1.0\nconfig.loss_params = dict(preset="facedistill", scale=32.0, sample_rate=0.5)\n'
    recipe = _variant(patched_checkout, "tiny_md_rates", "tiny_md", extra)
    _assert_one_refusal(_train(patched_checkout, recipe), "config.sample_rate = 1.0", "sample_rate", "0.5")


def test_leftover_teacher_keys_with_the_arcface_loss_are_one_warning(patched_checkout: Path) -> None:
    # The run goes on (the teacher is simply not used); a refusal elsewhere ends it early so the test stays short.
    extra = (
        'config.loss = "arcface"\nconfig.teacher = "sface"\nconfig.teacher_cache = "data/tiny/teacher_cache"\n'
        "config.num_classes = 7\n"
    )
    recipe = _variant(patched_checkout, "tiny_leftover", "tiny", extra)
    result = _train(patched_checkout, recipe, 2)
    _assert_one_refusal(result, "config.num_classes = 7")
    warnings = [line for line in _child_lines(result.stderr) if "warning" in line.lower()]
    assert len(warnings) == 1, result.stderr[-3000:]
    assert warnings[0].startswith("warning: ") and "config.teacher" in warnings[0]
    assert "config.teacher_cache" in warnings[0]


# ----------------------------------------------------------------------------- a teacher run with PartialFC shards

CLASSES = 6


@pytest.fixture(scope="module")
def shard_run(patched_checkout: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """An mbf teacher run saved by 2 processes with ``save_all_states`` (model.pt, checkpoint_gpu_0/1.pt, 3 of the
    tiny set's 6 classes each), and the recipe distilling it, its cache built by cache-teacher."""
    from facedistill.models import create_model

    directory = tmp_path_factory.mktemp("shard_run")
    teacher = directory / "run"
    teacher.mkdir()
    torch.manual_seed(0)
    torch.save(create_model("mbf", embedding_size=128).state_dict(), teacher / "model.pt")
    for rank in range(2):
        head = {"weight": torch.randn(CLASSES // 2, 128)}
        torch.save({"state_dict_softmax_fc": head, "epoch": 1}, teacher / f"checkpoint_gpu_{rank}.pt")
    extra = (
        f'config.teacher = "{teacher}"\nconfig.teacher_cache = "{directory / "cache"}"\n'
        "config.teacher_subtract_mean = False\n"
    )
    recipe = _variant(patched_checkout, "tiny_md_shards", "tiny_md", extra)
    _cache(patched_checkout, recipe, check=True)
    return teacher, recipe


def test_a_teacher_missing_a_shard_file_is_named_not_blamed_on_a_class_count(
    patched_checkout: Path, shard_run: tuple[Path, str]
) -> None:
    teacher, recipe = shard_run
    missing = teacher / "checkpoint_gpu_1.pt"
    kept = missing.read_bytes()
    missing.unlink()
    try:
        for result in (_train(patched_checkout, recipe, 2), _cache(patched_checkout, recipe)):
            line = _assert_one_refusal(result, "checkpoint_gpu_0.pt", "checkpoint_gpu_1.pt", "missing")
            assert "trained on another number of classes" not in line.split("missing")[0], line
    finally:
        missing.write_bytes(kept)


# --------------------------------------------------------------- cache-teacher checks the recipe before embedding


def test_cache_teacher_refuses_a_teacher_of_another_embedding_size_before_embedding(
    patched_checkout: Path, tmp_path: Path
) -> None:
    cache = tmp_path / "cache512"
    extra = f'config.embedding_size = 512\nconfig.teacher_cache = "{cache}"\n'
    recipe = _variant(patched_checkout, "tiny_md_512", "tiny_md", extra)
    _assert_one_refusal(_cache(patched_checkout, recipe), "128-d", "config.embedding_size = 512")
    assert not cache.exists()


def test_cache_teacher_refuses_a_wrong_class_count_before_embedding(patched_checkout: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache7"
    extra = f'config.num_classes = 7\nconfig.teacher_cache = "{cache}"\n'
    recipe = _variant(patched_checkout, "tiny_md_7", "tiny_md", extra)
    _assert_one_refusal(_cache(patched_checkout, recipe, 2), "config.num_classes = 7", "6 identities")
    assert not cache.exists()


def test_cache_teacher_refuses_subtract_mean_with_a_head_centred_teacher_before_embedding(
    patched_checkout: Path, shard_run: tuple[Path, str], tmp_path: Path
) -> None:
    teacher, _ = shard_run
    cache = tmp_path / "cache_mean"
    extra = f'config.teacher = "{teacher}"\nconfig.teacher_cache = "{cache}"\nconfig.teacher_subtract_mean = True\n'
    recipe = _variant(patched_checkout, "tiny_md_head_mean", "tiny_md", extra)
    _assert_one_refusal(_cache(patched_checkout, recipe), "config.teacher_subtract_mean", "config.teacher_centres")
    assert not cache.exists()
