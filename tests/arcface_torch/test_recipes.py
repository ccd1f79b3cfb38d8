"""Every shipped recipe loads through the framework's own get_config, and each _md twin differs from its
upstream config only in the distillation keys."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests.arcface_torch.helpers import UPSTREAM, copy_upstream, run

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
NAMES = sorted(path.stem for path in RECIPES.glob("*.py") if not path.name.startswith("_"))
TWINS = [name for name in NAMES if name.endswith("_md") and (UPSTREAM / "configs" / f"{name[:-3]}.py").exists()]

# In a fresh interpreter in the checkout (get_config imports configs.base and caches modules by name).
LOAD = r"""
import json, sys
from utils.utils_config import get_config
out = {}
for path in sys.argv[1:]:
    # get_config updates the module-level base config in place: a fresh one for every recipe, as in a run.
    sys.modules.pop("configs.base", None)
    cfg = get_config(path)
    out[path] = {key: (list(value) if isinstance(value, tuple) else value) for key, value in cfg.items()}
print(json.dumps(out, default=str))
"""


@pytest.fixture(scope="module")
def loaded(upstream: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, object]]:
    """Every recipe and every twin's upstream config, loaded by a patched checkout's get_config: the shipped
    recipes through configs/ (where `patch` installs them) and, once more, straight from recipes/ (the relaxed
    path rule)."""
    root = copy_upstream(tmp_path_factory.mktemp("recipes") / "arcface_torch")
    run([sys.executable, "-m", "facedistill.cli", "arcface-torch", "patch", str(root)], cwd=root)
    paths = [f"configs/{name}" for name in NAMES] + [str(RECIPES / f"{name}.py") for name in NAMES]
    paths += [f"configs/{name[:-3]}" for name in TWINS]
    script = root / "load_all.py"
    script.write_text(LOAD)
    result = run([sys.executable, str(script), *paths], cwd=root)
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_there_is_a_twin_for_every_upstream_mobilefacenet_config() -> None:
    upstream_mbf = {"ms1mv2_mbf", "ms1mv3_mbf", "glint360k_mbf", "wf4m_mbf", "wf12m_mbf", "wf42m_pfc02_16gpus_mbf_bs8k"}
    assert {f"{name}_md" for name in upstream_mbf} <= set(NAMES)
    assert {"celeba299_mbf", "celeba299_mbf_md"} <= set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_every_recipe_loads_through_the_frameworks_get_config(loaded: dict, name: str) -> None:
    cfg = loaded[f"configs/{name}"]
    assert cfg["network"] == "mbf"
    assert cfg["output"] == f"work_dirs/{name}"
    assert loaded[str(RECIPES / f"{name}.py")] == cfg


@pytest.mark.parametrize("name", TWINS)
def test_a_twin_differs_from_its_upstream_config_only_in_distillation_keys(loaded: dict, name: str) -> None:
    from facedistill.arcface_torch.recipe import PLUGIN_KEYS

    twin, original = dict(loaded[f"configs/{name}"]), dict(loaded[f"configs/{name[:-3]}"])
    twin.pop("output"), original.pop("output")
    distillation = {key: twin.pop(key) for key in list(twin) if key in PLUGIN_KEYS}
    assert twin == original
    assert distillation["loss"] == "margin_distillation"
    assert distillation["teacher"].endswith("_r100") and distillation["teacher_network"] == "r100"


def test_the_cpu_protocol_twins_differ_only_in_distillation_keys(loaded: dict) -> None:
    from facedistill.arcface_torch.recipe import PLUGIN_KEYS

    baseline, md = dict(loaded["configs/celeba299_mbf"]), dict(loaded["configs/celeba299_mbf_md"])
    baseline.pop("output"), md.pop("output")
    assert {key: value for key, value in md.items() if key not in PLUGIN_KEYS} == baseline
    assert md["loss"] == "margin_distillation" and md["teacher"] == "sface"


@pytest.mark.parametrize("rank", ["0", "1"])
def test_fp16_on_a_cpu_warns_once_naming_the_key(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], rank: str
) -> None:
    import torch
    from easydict import EasyDict as edict

    from facedistill.arcface_torch.recipe import check_config

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("RANK", rank)
    cfg = edict(loss=None, fp16=True, rec="data/x")
    assert check_config(cfg) is cfg
    err = capsys.readouterr().err
    if rank == "0":
        assert err.count("\n") == 1 and err.startswith("warning: config.fp16 = True") and "config.fp16 = False" in err
    else:
        assert err == ""  # the other ranks stay quiet
    check_config(edict(loss=None, fp16=False, rec="data/x"))
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    check_config(cfg)
    assert capsys.readouterr().err == ""  # on a GPU fp16 is what the framework intends


@pytest.mark.parametrize(
    ("loss_params", "message"),
    [
        ({"kd_weight": -1.0}, 'config.loss_params["kd_weight"] must be >= 0, got -1.0'),
        ({"sample_rate": 1.5}, 'config.loss_params["sample_rate"] must be in (0, 1], got 1.5'),
        ({"m_min": 0.6, "m_max": 0.5}, 'config.loss_params["m_min"] must satisfy 0 <= m_min <= m_max'),
        ({"preset": "paper"}, "config.loss_params[\"preset\"]: 'paper' is not one of 'facedistill', 'official'"),
        ({"kd_weight": "x"}, 'config.loss_params["kd_weight"]'),
    ],
)
def test_a_bad_hyper_parameter_is_named_as_the_recipe_spells_it(loss_params: dict, message: str) -> None:
    # The same checks name the toolkit's key method.kd_weight; the recipe's user typed a dict entry.
    from easydict import EasyDict as edict

    from facedistill.arcface_torch.recipe import RecipeError, recipe_method

    cfg = edict(loss="margin_distillation", loss_params=loss_params, sample_rate=1.0)
    with pytest.raises(RecipeError) as caught:
        recipe_method(cfg)
    assert str(caught.value).startswith(message), str(caught.value)
    assert "method." not in str(caught.value)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"shift": -2}, "config.shift must be a whole number of pixels >= 0, got -2"),
        ({"shift": 2.5}, "config.shift must be a whole number of pixels >= 0, got 2.5"),
        ({"shift": True}, "config.shift must be a whole number of pixels >= 0, got True"),
        ({"shift": 4, "dali": True}, "config.shift = 4 is applied by facedistill's datasets, which DALI bypasses"),
        ({"shift": 4, "rec": "synthetic"}, "config.shift = 4 is applied by facedistill's datasets, which synthetic"),
    ],
)
@pytest.mark.parametrize("loss", [None, "margin_distillation"])
def test_a_bad_shift_is_refused_naming_the_key_with_any_loss(changes: dict, message: str, loss: str | None) -> None:
    from easydict import EasyDict as edict

    from facedistill.arcface_torch.recipe import RecipeError, data_shift, validate

    cfg = edict({"loss": loss, "teacher": "sface", "rec": "data/x", "dali": False, **changes})
    with pytest.raises(RecipeError) as caught:
        validate(cfg)
    assert str(caught.value).startswith(message), str(caught.value)
    assert data_shift(edict(rec="data/x")) == 0 and data_shift(edict(rec="data/x", shift=4)) == 4
