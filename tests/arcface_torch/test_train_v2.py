"""The patched upstream ``train_v2.py``, run for real under a 2-process gloo torchrun on CPU."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.arcface_torch.helpers import LFW, facedistill, run, tiny_md_recipe, torchrun

LOSS = re.compile(r"Loss (\d+\.\d+)")


def losses(log: Path) -> list[float]:
    return [float(match.group(1)) for match in LOSS.finditer(log.read_text())]


def test_margin_distillation_trains_with_shift_and_its_model_evaluates_and_exports(patched_checkout: Path) -> None:
    root = patched_checkout
    # config.shift on: the loader translates every image and the head still reads the unshifted image's cache row.
    recipe = (root / "configs" / "tiny_md.py").read_text() + "config.shift = 2\n"
    (root / "configs" / "tiny_md_shift.py").write_text(recipe)
    result = run(torchrun(2, "train_v2.py", "configs/tiny_md_shift"), cwd=root)
    log = root / "work_dirs" / "tiny_md_shift" / "training.log"
    assert re.search(r": shift\s+2$", log.read_text(), re.MULTILINE), log.read_text()[:3000]
    values = losses(log)
    assert len(values) >= 12, result.stdout[-2000:]
    first, last = sum(values[:4]) / 4, sum(values[-4:]) / 4
    assert last < first - 1.0, f"MarginDistillation loss did not fall: {values}"
    # The framework's own CallBackVerification ran on the .bin val target, read without mxnet or pickle.load.
    assert re.search(r"\[tinylfw\]\[\d+\]Accuracy-Flip: \d\.\d+", log.read_text())

    model = root / "work_dirs" / "tiny_md_shift" / "model.pt"
    pairs = root.parent.parent / "tiny_pairs.txt"
    evaluated = run(facedistill("eval", str(model), "--pairs", str(pairs), "--images", str(LFW)), cwd=root)
    assert "accuracy" in evaluated.stdout.lower(), evaluated.stdout
    exported = run(facedistill("export", str(model), "-o", str(root / "student.onnx")), cwd=root)
    assert (root / "student.onnx").is_file(), exported.stdout


def test_without_a_facedistill_loss_the_framework_trains_as_before(patched_checkout: Path) -> None:
    result = run(torchrun(2, "train_v2.py", "configs/tiny"), cwd=patched_checkout)
    log = patched_checkout / "work_dirs" / "tiny" / "training.log"
    assert len(losses(log)) >= 12, result.stdout[-2000:]
    assert "loss                     margin_distillation" not in log.read_text()


def test_an_unknown_method_stops_the_run_in_one_line_listing_the_known_ones(patched_checkout: Path) -> None:
    recipe = (patched_checkout / "configs" / "tiny_md.py").read_text().replace('"margin_distillation"', '"foo"')
    (patched_checkout / "configs" / "tiny_foo.py").write_text(recipe)
    result = run(torchrun(1, "train_v2.py", "configs/tiny_foo"), cwd=patched_checkout, check=False)
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert lines, result.stderr[-3000:]
    assert "config.loss: unknown method 'foo'" in lines[0]
    assert "margin_distillation" in lines[0] and "arcdistill" in lines[0] and "arcface" in lines[0]
    assert not (patched_checkout / "work_dirs" / "tiny_foo" / "model.pt").exists()


@pytest.fixture
def in_checkout(patched_checkout: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(patched_checkout)
    return patched_checkout


def test_loss_params_without_a_facedistill_loss_is_refused_before_any_data_is_read(patched_checkout: Path) -> None:
    # config.rec and the val targets point nowhere: the refusal must come from the recipe check, which runs
    # in get_config, before the framework opens its data (a user once waited 71 s for it).
    recipe = (
        "from easydict import EasyDict as edict\n"
        "config = edict(loss='arcface', loss_params=dict(kd_weight=1.0), rec='no/such/folder', num_classes=6,\n"
        "               num_image=60, val_targets=['no_such_target'], network='mbf', embedding_size=128,\n"
        "               batch_size=4, num_epoch=1, fp16=False)\n"
    )
    (patched_checkout / "configs" / "tiny_arcface_params.py").write_text(recipe)
    result = run(torchrun(1, "train_v2.py", "configs/tiny_arcface_params"), cwd=patched_checkout, check=False)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr[-3000:]
    # It says both ways out: a method to distil with, or the framework's ArcFace without the key.
    assert errors[0].startswith("error: config.loss_params is set but config.loss selects no facedistill method: "), (
        errors[0]
    )
    assert "margin_distillation" in errors[0] and "remove config.loss_params" in errors[0], errors[0]
    assert "no/such/folder" not in result.stderr and "no_such_target" not in result.stderr


def test_a_teacher_of_another_embedding_size_is_refused_with_both_numbers(in_checkout: Path) -> None:
    from facedistill.arcface_torch.head import build_distill_head
    from facedistill.arcface_torch.recipe import RecipeError

    with pytest.raises(RecipeError, match=r"128-d embeddings but config.embedding_size = 512"):
        build_distill_head(tiny_md_recipe(in_checkout, embedding_size=512), 0, 1)


def test_a_class_count_other_than_the_datas_is_refused_with_both_numbers(in_checkout: Path) -> None:
    from facedistill.arcface_torch.head import build_distill_head
    from facedistill.arcface_torch.recipe import RecipeError

    with pytest.raises(RecipeError, match=r"config.num_classes = 5 but data/tiny holds 6 identities"):
        build_distill_head(tiny_md_recipe(in_checkout, num_classes=5), 0, 1)


def test_a_teachers_head_with_other_classes_is_refused_with_both_numbers(in_checkout: Path, tmp_path: Path) -> None:
    import shutil

    import numpy as np

    from facedistill.arcface_torch.head import build_distill_head
    from facedistill.arcface_torch.recipe import RecipeError

    cache = tmp_path / "cache"
    shutil.copytree(in_checkout / "data" / "tiny" / "teacher_cache", cache)
    np.save(cache / "head_centres.npy", np.random.default_rng(0).normal(size=(9, 128)).astype(np.float32))
    cfg = tiny_md_recipe(in_checkout, teacher_cache=str(cache), teacher_centres="head", teacher_subtract_mean=False)
    with pytest.raises((RecipeError, ValueError), match=r"9 classes .* 6"):
        build_distill_head(cfg, 0, 1)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("dataset_fingerprint", "recordio:another", "built for another dataset"),
        ("teacher_id", "sface-0000000000000000-RGB_mean0_std1", "holds embeddings of teacher"),
    ],
)
def test_a_cache_of_another_rec_or_teacher_is_refused(
    in_checkout: Path, tmp_path: Path, field: str, value: str, message: str
) -> None:
    import shutil

    from facedistill.arcface_torch.head import build_distill_head

    cache = tmp_path / "cache"
    shutil.copytree(in_checkout / "data" / "tiny" / "teacher_cache", cache)
    manifest = json.loads((cache / "manifest.json").read_text())
    manifest[field] = value
    (cache / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=message) as refused:
        build_distill_head(tiny_md_recipe(in_checkout, teacher_cache=str(cache)), 0, 1)
    # The plugin's own command, not the toolkit's `facedistill cache-teacher`.
    assert "rebuild it with `facedistill arcface-torch cache-teacher CONFIG --overwrite`" in str(refused.value)


def test_an_unfinished_cache_names_the_plugins_command(in_checkout: Path, tmp_path: Path) -> None:
    import shutil

    from facedistill.arcface_torch.head import build_distill_head

    cache = tmp_path / "cache"
    shutil.copytree(in_checkout / "data" / "tiny" / "teacher_cache", cache)
    done = bytearray((cache / "chunks.done").read_bytes())
    done[-1] = 0  # the last chunk unwritten, as after a kill
    (cache / "chunks.done").write_bytes(bytes(done))
    with pytest.raises(ValueError, match="is incomplete") as refused:
        build_distill_head(tiny_md_recipe(in_checkout, teacher_cache=str(cache)), 0, 1)
    assert "run `facedistill arcface-torch cache-teacher CONFIG` again to finish it" in str(refused.value)


def test_a_missing_cache_says_how_to_build_it(in_checkout: Path, tmp_path: Path) -> None:
    from facedistill.arcface_torch.head import build_distill_head
    from facedistill.arcface_torch.recipe import RecipeError

    with pytest.raises(RecipeError, match=r"facedistill arcface-torch cache-teacher"):
        build_distill_head(tiny_md_recipe(in_checkout, teacher_cache=str(tmp_path / "none")), 0, 1)


@pytest.mark.parametrize("method", ["arcdistill", "kd", "angular", "margin_distillation"])
def test_the_zoos_methods_the_recipe_can_serve_build_and_score_a_batch(in_checkout: Path, method: str) -> None:
    import torch

    from facedistill.arcface_torch import hooks
    from facedistill.arcface_torch.data import RecordFaceDataset
    from facedistill.arcface_torch.head import build_distill_head

    params = {} if method != "margin_distillation" else {"kd_weight": 1.0}
    cfg = tiny_md_recipe(in_checkout, loss=method, loss_params=params)
    head = build_distill_head(cfg, 0, 1)
    dataset = RecordFaceDataset("data/tiny", teacher=hooks.teacher_rows(cfg))
    batch = [dataset[index] for index in range(4)]
    labels, rows = (torch.stack([item[k] for item in batch]) for k in (1, 2))
    embeddings = torch.randn(4, 128, requires_grad=True)
    loss = head.train()(embeddings, labels, rows)
    loss.backward()
    assert torch.isfinite(loss) and embeddings.grad is not None and embeddings.grad.abs().sum() > 0


def test_methods_that_need_identity_balanced_batches_are_refused_with_the_reason(in_checkout: Path) -> None:
    from facedistill.arcface_torch.recipe import RecipeError, validate

    with pytest.raises(RecipeError, match="unknown method 'triplet' .*identity-balanced batches"):
        validate(tiny_md_recipe(in_checkout, loss="triplet"))


def test_subtract_mean_centres_the_plugins_centres_rows_and_normaliser_as_the_toolkit_does(
    in_checkout: Path, tmp_path: Path
) -> None:
    import shutil

    import numpy as np
    import torch
    import torch.nn.functional as F

    from facedistill.arcface_torch.data import open_framework_dataset
    from facedistill.arcface_torch.head import build_distill_head
    from facedistill.teachers.cache import TeacherCache

    cache_dir = tmp_path / "cache"
    shutil.copytree(in_checkout / "data" / "tiny" / "teacher_cache", cache_dir)
    for stored in cache_dir.glob("mean_embedding.*"):
        stored.unlink()
    cfg = tiny_md_recipe(in_checkout, teacher_cache=str(cache_dir))
    assert cfg.teacher_subtract_mean and cfg.loss_params["preset"] == "facedistill"
    head = build_distill_head(cfg, 0, 1)
    # The toolkit's own single-process computation, from the whole cache: mean, centred mean centres, typicality.
    cache = TeacherCache(cache_dir)
    labels = np.asarray(open_framework_dataset("data/tiny").labels)
    rows = F.normalize(torch.from_numpy(np.asarray(cache.embeddings, dtype=np.float32)), dim=2)
    mean = rows.reshape(-1, rows.shape[-1]).mean(0)
    torch.testing.assert_close(head.teacher_offset, mean, atol=1e-6, rtol=1e-5)
    centres = cache.mean_centres(labels, 6, offset=mean)
    torch.testing.assert_close(head.method.head.weight.float(), centres, atol=1e-5, rtol=1e-5)
    peak = cache.typicality(centres, labels, offset=mean).max()
    assert float(head.method.dataset_max) == pytest.approx(float(peak), abs=1e-5)
    # Computed once and stored with the cache; the rows the method reads are centred like the centres.
    assert (cache_dir / "mean_embedding.npy").exists() and (cache_dir / "mean_embedding.json").exists()
    index, mirrored = torch.tensor([0, 3]), torch.tensor([False, True])
    expected = F.normalize(cache.rows(index, mirrored), dim=1) - mean
    torch.testing.assert_close(cache.rows(index, mirrored, head.teacher_offset), expected)


def test_subtract_mean_with_a_head_centred_teacher_is_refused_naming_the_recipe_keys(
    in_checkout: Path, tmp_path: Path
) -> None:
    import shutil

    import numpy as np

    from facedistill.arcface_torch.head import build_distill_head
    from facedistill.arcface_torch.recipe import RecipeError

    cache = tmp_path / "cache"
    shutil.copytree(in_checkout / "data" / "tiny" / "teacher_cache", cache)
    np.save(cache / "head_centres.npy", np.random.default_rng(0).normal(size=(6, 128)).astype(np.float32))
    cfg = tiny_md_recipe(in_checkout, teacher_cache=str(cache))
    with pytest.raises(RecipeError, match=r"^config.teacher_subtract_mean centres .* config.teacher_centres = 'mean'"):
        build_distill_head(cfg, 0, 1)
    head = build_distill_head(tiny_md_recipe(in_checkout, teacher_cache=str(cache), teacher_centres="mean"), 0, 1)
    assert head.teacher_offset is not None


def test_a_stored_mean_of_another_cache_is_refused(in_checkout: Path, tmp_path: Path) -> None:
    import shutil

    from facedistill.arcface_torch.head import build_distill_head
    from facedistill.arcface_torch.recipe import RecipeError

    cache = tmp_path / "cache"
    shutil.copytree(in_checkout / "data" / "tiny" / "teacher_cache", cache)
    build_distill_head(tiny_md_recipe(in_checkout, teacher_cache=str(cache)), 0, 1)  # stores the mean
    manifest = json.loads((cache / "manifest.json").read_text())
    manifest["store_id"] = "0" * 32  # another build of the cache, as --overwrite makes
    (cache / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(RecipeError, match=r"mean_embedding.npy is the mean embedding of another teacher cache"):
        build_distill_head(tiny_md_recipe(in_checkout, teacher_cache=str(cache)), 0, 1)


def test_the_official_preset_reads_the_original_images_row_for_a_mirror(in_checkout: Path) -> None:
    import torch

    from facedistill.arcface_torch import hooks
    from facedistill.arcface_torch.data import RecordFaceDataset
    from facedistill.arcface_torch.head import build_distill_head

    cfg = tiny_md_recipe(in_checkout, loss_params=dict(preset="official"), teacher_subtract_mean=False)
    head = build_distill_head(cfg, 0, 1)
    params = head.method.params
    assert (params.scale, params.normaliser, params.clamp, params.guard, params.past_pi) == (
        64.0, "local_batch", False, False, "cos",
    )  # fmt: skip
    teacher = hooks.teacher_rows(cfg)
    dataset = RecordFaceDataset("data/tiny", teacher=teacher)
    labels = torch.tensor([dataset[i][1] for i in range(4)])
    flipped, unflipped = (torch.stack([teacher.row(i, mirrored) for i in range(4)]) for mirrored in (True, False))
    embeddings = torch.randn(4, 128)
    assert head(embeddings, labels, flipped).item() == pytest.approx(head(embeddings, labels, unflipped).item())
    validated = build_distill_head(tiny_md_recipe(in_checkout), 0, 1)
    assert validated(embeddings, labels, flipped).item() != pytest.approx(
        validated(embeddings, labels, unflipped).item()
    )


def test_an_unknown_preset_is_refused_when_the_recipe_loads(in_checkout: Path) -> None:
    from facedistill.arcface_torch.recipe import RecipeError, validate

    message = r"config\.loss_params\[\"preset\"\]: 'paper' is not one of 'facedistill', 'official'$"
    with pytest.raises(RecipeError, match=message):
        validate(tiny_md_recipe(in_checkout, loss_params=dict(preset="paper")))
