"""The keys facedistill adds to an arcface_torch recipe, and how recipes are loaded and checked.

A recipe is the framework's easydict config (``configs/base.py`` merged with the job's file). facedistill reads
these keys from it; absent keys keep the framework's behaviour::

    config.loss = "margin_distillation"   # absent or "arcface": the framework's CombinedMarginLoss + PartialFC_V2
    config.loss_params = dict(m_min=0.2, m_max=0.5)   # the method's hyper-parameters; defaults: the method's own
    config.teacher = "work_dirs/ms1mv3_r100"          # an arcface_torch run dir, an .onnx model, or "sface"
    config.teacher_network = "r100"                   # optional: the run's network, read from its model.pt
    config.teacher_cache = "/train_tmp/ms1mv3/teacher_r100"   # default: <config.rec>/teacher_cache
    config.teacher_centres = "auto"                   # auto | head | mean
    config.teacher_subtract_mean = False              # centre the teacher space (mean centres only)
    config.shift = 0                                  # translate training images by up to N pixels (any loss)

The patched ``utils/utils_config.py`` loads every recipe through :func:`load_job_config` (a ``configs/NAME`` path
exactly as upstream, or any recipe file, e.g. one shipped in facedistill's ``recipes/``) and checks it with
:func:`check_config` before the run touches data or GPUs: an unknown method lists the known ones, a wrong
hyper-parameter names its key. Nothing here executes anything but the recipe file the user named.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import os
import sys
from pathlib import Path
from typing import Any, Protocol

from facedistill.config import ConfigError, from_dict
from facedistill.distill.context import CENTRE_SOURCES, TeacherKeys

# The framework's own loss; every other name is a facedistill method.
FRAMEWORK_LOSS = "arcface"
# arcface_torch's network names -> facedistill backbones that load their state_dicts.
NETWORKS = {"r18": "iresnet18", "r34": "iresnet34", "r50": "iresnet50", "r100": "iresnet100", "mbf": "mbf"}
PLUGIN_KEYS = (
    "loss",
    "loss_params",
    "teacher",
    "teacher_network",
    "teacher_cache",
    "teacher_centres",
    "teacher_subtract_mean",
    "shift",
)
# The recipe's names of the teacher keys facedistill's own config calls teacher.centres / teacher.subtract_mean.
RECIPE_TEACHER_KEYS = TeacherKeys(centres="config.teacher_centres", subtract_mean="config.teacher_subtract_mean")


class Recipe(Protocol):
    """An arcface_torch recipe as the framework's ``get_config`` returns it: an easydict, whose keys are read as
    attributes (``cfg.rec``) and, for the optional ones, with ``cfg.get(key)``."""

    def get(self, key: str, default: Any = None) -> Any: ...

    def __getattr__(self, name: str) -> Any: ...


class RecipeError(ConfigError):
    """A recipe key or value that facedistill cannot run with; the message names the key."""


def served_methods() -> dict[str, type]:
    """The facedistill methods a recipe can select with ``config.loss``: every registered method but the
    framework's own ArcFace, and but those that need identity-balanced batches (triplet, EKD), which the
    framework's random sampler cannot give."""
    from facedistill.distill import METHODS

    methods = {name: METHODS.get(name) for name in METHODS.names() if name != FRAMEWORK_LOSS}
    return {name: cls for name, cls in methods.items() if not cls.needs_identity_balanced_batches}


def method_name(cfg: Recipe) -> str | None:
    """The facedistill method the recipe selects, or None for the framework's own loss."""
    loss = cfg.get("loss")
    return None if loss in (None, FRAMEWORK_LOSS) else loss


def recipe_method(cfg: Recipe) -> tuple[type, Any]:
    """The selected method's class and validated hyper-parameters (``config.loss_params`` over its defaults)."""
    name = method_name(cfg)
    methods = served_methods()
    if name not in methods:
        from facedistill.distill import METHODS

        reason = ""
        if name in METHODS:
            reason = " (it needs identity-balanced batches, which arcface_torch's sampler does not give)"
        known = ", ".join([FRAMEWORK_LOSS, *sorted(methods)])
        raise RecipeError(f"config.loss: unknown method {name!r}{reason}; known: {known}")
    params = cfg.get("loss_params") or {}
    if not isinstance(params, dict):
        raise RecipeError(f"config.loss_params must be a dict of {name}'s hyper-parameters, got {params!r}")
    params = dict(params)
    fields = {field.name for field in dataclasses.fields(methods[name].Params)}
    if "sample_rate" in fields and "sample_rate" not in params:
        # The framework's own PartialFC key samples the method's frozen centres the same way.
        params["sample_rate"] = float(cfg.get("sample_rate", 1.0))
    try:
        return methods[name], from_dict(methods[name].Params, params, prefix="config.loss_params", item_keys=True)
    except (ConfigError, ValueError, TypeError) as error:
        raise RecipeError(str(error)) from None


# What an arcface_torch user runs to build or finish a recipe's teacher cache: every refusal of the cache names it.
CACHE_COMMAND = "facedistill arcface-torch cache-teacher CONFIG"


def teacher_cache_dir(cfg: Recipe) -> Path:
    return Path(cfg.get("teacher_cache") or os.path.join(str(cfg.rec), "teacher_cache"))


def validate(cfg: Recipe) -> Any:
    """Check facedistill's keys of a loaded recipe; raise ``RecipeError`` naming the key. Returns ``cfg``."""
    data_shift(cfg)
    name = method_name(cfg)
    if name is None:
        for key in ("loss_params", "teacher_centres", "teacher_subtract_mean"):
            if cfg.get(key):
                raise RecipeError(f"config.{key} is set but config.loss selects no facedistill method")
        return cfg
    if not isinstance(name, str):
        raise RecipeError(f"config.loss must be a method name, got {name!r}")
    method_cls, _ = recipe_method(cfg)
    if method_cls.needs_teacher and not cfg.get("teacher"):
        raise RecipeError(
            f"config.loss = {name!r} distils a teacher: set config.teacher to an arcface_torch run directory, "
            "an .onnx model or 'sface'"
        )
    network = cfg.get("teacher_network")
    if network is not None and network not in NETWORKS:
        raise RecipeError(
            f"config.teacher_network = {network!r} is not one of {', '.join(NETWORKS)} (or leave it out: the network "
            "is read from the teacher run's model.pt)"
        )
    centres = cfg.get("teacher_centres") or "auto"
    if centres not in CENTRE_SOURCES:
        raise RecipeError(f"config.teacher_centres = {centres!r} is not one of {', '.join(CENTRE_SOURCES)}")
    subtract_mean = cfg.get("teacher_subtract_mean", False)
    if not isinstance(subtract_mean, bool):
        raise RecipeError(f"config.teacher_subtract_mean must be True or False, got {subtract_mean!r}")
    if cfg.get("dali") or cfg.rec == "synthetic":
        source = "DALI" if cfg.get("dali") else "synthetic data"
        raise RecipeError(
            f"config.loss = {name!r} reads each image's cached teacher embedding by record index, which {source} "
            "does not give; set config.dali = False and point config.rec at a .rec folder or image folder"
        )
    return cfg


def data_shift(cfg: Recipe) -> int:
    """``config.shift``: the most pixels each training image is translated by after its flip (0, the default:
    upstream's augmentation). The teacher's cached row of the unshifted image stays a distilled method's target,
    which a few pixels barely move (``benchmarks/teacher_shift_invariance.py``)."""
    shift = cfg.get("shift", 0)
    if isinstance(shift, bool) or not isinstance(shift, int) or shift < 0:
        raise RecipeError(f"config.shift must be a whole number of pixels >= 0, got {shift!r}")
    if shift and (cfg.get("dali") or cfg.rec == "synthetic"):
        source = "DALI" if cfg.get("dali") else "synthetic data"
        raise RecipeError(
            f"config.shift = {shift} is applied by facedistill's datasets, which {source} bypasses; set "
            "config.shift = 0, or config.dali = False with config.rec pointing at a .rec folder or image folder"
        )
    return shift


def cpu_fp16_warning(cfg: Recipe) -> str | None:
    """The one-line warning for ``config.fp16 = True`` without CUDA, else None.

    On a CPU torch turns the framework's GradScaler off and runs float16 autocast by emulation: the run works,
    about 2.4x slower on an AVX2 machine (measured by a user trying the CPU protocol), and nothing else says so."""
    import torch

    if not cfg.get("fp16") or torch.cuda.is_available():
        return None
    return (
        "warning: config.fp16 = True but there is no CUDA device: the CPU emulates float16 (about 2.4x slower "
        "on AVX2) and the grad scaler is off; set config.fp16 = False for a CPU run"
    )


def check_config(cfg: Recipe) -> Any:
    """``validate`` for the framework's ``get_config``: a bad recipe raises ``RecipeError`` (one line from rank 0
    under the patched ``train_v2.py``, see ``refusals``), and so does a val target that cannot be scored; a
    recipe that runs but slowly for a known reason, or a val target that does not exist, is said once (rank 0)."""
    from facedistill.arcface_torch import refusals

    validate(cfg)
    existing, missing = val_target_paths(cfg)
    absent = [f"warning: config.val_targets: {path} does not exist; the framework skips it" for path in missing]
    for warning in [cpu_fp16_warning(cfg), *absent]:
        if warning and refusals.rank() == 0:
            print(warning, file=sys.stderr, flush=True)
    check_val_targets(existing)
    return cfg


def val_target_paths(cfg: Recipe) -> tuple[list[Path], list[Path]]:
    """The ``.bin`` files of ``config.val_targets`` in ``config.rec`` as the framework finds them: (existing,
    missing); upstream skips the missing ones without a word."""
    paths = [Path(str(cfg.rec)) / f"{name}.bin" for name in cfg.get("val_targets") or []]
    return [path for path in paths if path.is_file()], [path for path in paths if not path.is_file()]


def check_val_targets(paths: list[Path]) -> None:
    """Refuse an unsafe or unscorable val-target ``.bin`` on every rank, before any data is read.

    Upstream loads the val targets on rank 0 only, after building the data and the model: a bad pack stopped rank 0
    alone, minutes in, and the other ranks died in their next collective. Here every rank unpickles each pack
    (restricted: bytes and booleans only) and checks its fold layout; images are decoded later, by rank 0, as
    upstream does."""
    from facedistill.data.verification import check_bin_folds, read_bin

    for path in paths:
        _, issame = read_bin(path)
        check_bin_folds(issame, path)


def load_job_config(config_file: str) -> Any:
    """The job's ``config`` object: ``configs/NAME`` is imported as upstream does (``configs.NAME``), any other
    path (with or without ``.py``) is loaded from that file."""
    if config_file.startswith("configs/"):
        module_name = os.path.splitext(os.path.basename(config_file))[0]
        return importlib.import_module(f"configs.{module_name}").config
    path = Path(config_file)
    if path.suffix != ".py":
        path = path.with_name(path.name + ".py")
    if not path.is_file():
        raise RecipeError(f"recipe {config_file!r} not found (looked for {path})")
    module_name = f"facedistill_recipe_{path.stem}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    if not hasattr(module, "config"):
        raise RecipeError(f"recipe {path} defines no `config` (an easydict, as arcface_torch's configs do)")
    return module.config
