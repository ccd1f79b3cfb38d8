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
    config.teacher_colour_order = "RGB"               # an .onnx teacher's input, when its file does not say
    config.teacher_mean = 127.5                       #   (facedistill export's do): a number or three, raw 0..255
    config.teacher_std = 127.5
    config.shift = 0                                  # translate training images by up to N pixels (any loss)

The patched ``utils/utils_config.py`` loads every recipe through :func:`load_job_config` (a ``configs/NAME`` path
exactly as upstream, or any recipe file, e.g. one shipped in facedistill's ``recipes/``) and checks it with
:func:`check_config` before the run touches data or GPUs: an unknown method lists the known ones, a wrong
hyper-parameter names its key. Nothing here executes anything but the recipe file the user named.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import importlib.util
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Protocol

from facedistill.config import ConfigError, from_dict
from facedistill.distill.context import CENTRE_SOURCES, TeacherKeys
from facedistill.teachers.base import PREPROCESSING_FIELDS, PreprocessingError, PreprocessingKeys, given_preprocessing

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
    "teacher_colour_order",
    "teacher_mean",
    "teacher_std",
    "shift",
)
# The recipe's names of the teacher keys facedistill's own config calls teacher.centres / teacher.subtract_mean.
RECIPE_TEACHER_KEYS = TeacherKeys(centres="config.teacher_centres", subtract_mean="config.teacher_subtract_mean")
# ... and of an .onnx teacher's preprocessing (teacher.colour_order, teacher.mean, teacher.std).
RECIPE_PREPROCESSING_KEYS = PreprocessingKeys(
    "config.teacher_colour_order", "config.teacher_mean", "config.teacher_std"
)


class Recipe(Protocol):
    """An arcface_torch recipe as the framework's ``get_config`` returns it: an easydict, whose keys are read as
    attributes (``cfg.rec``) and, for the optional ones, with ``cfg.get(key)``."""

    def get(self, key: str, default: Any = None) -> Any: ...

    def __iter__(self) -> Any: ...

    def __getattr__(self, name: str) -> Any: ...


class RecipeError(ConfigError):
    """A recipe key or value that facedistill cannot run with; the message names the key."""


def recipe_preprocessing(cfg: Recipe) -> dict[str, Any]:
    """The preprocessing keys the recipe sets for its .onnx teacher, each checked; whether they are needed, and
    whether they agree with what the model's metadata says, is decided when the teacher is built. Refused for a
    teacher that is not an .onnx model: a run's backbone and SFace bring their own."""
    given = {field: cfg.get(f"teacher_{field}") for field in PREPROCESSING_FIELDS}
    given = {field: value for field, value in given.items() if value is not None}
    teacher = cfg.get("teacher")
    if given and Path(str(teacher)).suffix.lower() != ".onnx":
        key = RECIPE_PREPROCESSING_KEYS.of(next(iter(given)))
        raise RecipeError(
            f"{key} applies to an .onnx teacher only; config.teacher = {teacher!r} has its own preprocessing: "
            "leave it out"
        )
    try:
        return given_preprocessing(given, RECIPE_PREPROCESSING_KEYS)
    except PreprocessingError as error:
        raise RecipeError(str(error)) from None


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
    given_rate = params.get("sample_rate")
    if "sample_rate" in fields and "sample_rate" not in params:
        # The framework's own PartialFC key samples the method's frozen centres the same way.
        params["sample_rate"] = float(cfg.get("sample_rate", 1.0))
    try:
        built = from_dict(methods[name].Params, params, prefix="config.loss_params", item_keys=True)
    except (ConfigError, ValueError, TypeError) as error:
        raise RecipeError(str(error)) from None
    framework_rate = cfg.get("sample_rate")
    if given_rate is not None and framework_rate is not None and float(given_rate) != float(framework_rate):
        # One of the two would be dropped without a word (the method's), and the user cannot tell which ran.
        raise RecipeError(
            f'config.sample_rate = {framework_rate} and config.loss_params["sample_rate"] = {given_rate} disagree: '
            f"both set the share of classes {name}'s head samples; set it once, as config.sample_rate (the "
            "framework's key; configs/base.py makes it 1 where a recipe does not set it), and drop it from "
            "config.loss_params"
        )
    return methods[name], built


# What an arcface_torch user runs to build or finish a recipe's teacher cache: every refusal of the cache names it.
CACHE_COMMAND = "facedistill arcface-torch cache-teacher CONFIG"


def teacher_cache_dir(cfg: Recipe) -> Path:
    return Path(cfg.get("teacher_cache") or os.path.join(str(cfg.rec), "teacher_cache"))


def validate(cfg: Recipe) -> Any:
    """Check facedistill's keys of a loaded recipe; raise ``RecipeError`` naming the key. Returns ``cfg``."""
    data_shift(cfg)
    name = method_name(cfg)
    if name is None:
        unused = ("loss_params", "teacher_centres", "teacher_subtract_mean")
        for key in (*unused, *(f"teacher_{field}" for field in PREPROCESSING_FIELDS)):
            if cfg.get(key):
                # Refused, not warned like the teacher keys: it would change a distillation, so the user meant one.
                raise RecipeError(
                    f"config.{key} is set but config.loss selects no facedistill method: set config.loss to one "
                    f"({', '.join(sorted(served_methods()))}) to distil, or remove config.{key} to train the "
                    "framework's own ArcFace"
                )
        check_dali(cfg)
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
    recipe_preprocessing(cfg)
    if cfg.get("dali") or cfg.rec == "synthetic":
        source = "DALI" if cfg.get("dali") else "synthetic data"
        raise RecipeError(
            f"config.loss = {name!r} reads each image's cached teacher embedding by record index, which {source} "
            "does not give; set config.dali = False and point config.rec at a .rec folder or image folder"
        )
    return cfg


def dali_installed() -> bool:
    try:
        return importlib.util.find_spec("nvidia.dali") is not None
    except (ImportError, ValueError):  # no "nvidia" package at all
        return False


def check_dali(cfg: Recipe) -> None:
    """``config.dali = True`` with the framework's own loss: upstream's DALI loader (``dali_data_iter`` in the patched
    ``dataset.py``) reads ``train.rec`` with NVIDIA DALI's own reader and decodes on the GPU, bypassing facedistill's
    readers. Without the ``nvidia.dali`` package or a CUDA GPU it dies in a long traceback at start-up; refused here,
    when the recipe loads, saying what is missing. (A facedistill method refuses DALI in ``validate`` whatever is
    installed: it reads each sample's teacher row by record index, which DALI does not give.)"""
    if not cfg.get("dali"):
        return
    import torch

    lacking = []
    if not dali_installed():
        lacking.append("NVIDIA DALI (the nvidia.dali package, not installed here)")
    if not torch.cuda.is_available():
        lacking.append("a CUDA GPU (there is none here)")
    if lacking:
        raise RecipeError(
            f"config.dali = True needs {' and '.join(lacking)}: the framework's DALI loader reads {cfg.rec}/train.rec "
            "with DALI's own reader and decodes it on the GPU, instead of facedistill's readers; set config.dali = "
            "False to read it with facedistill's RecordIO reader, on any device"
        )


def check_training_set(cfg: Recipe, dataset: Any) -> None:
    """``config.num_classes`` and ``config.num_image`` against ``config.rec``'s training set (``dataset``, the
    facedistill dataset behind it), with any loss, before a sample is read (``hooks.build_head``, ``cache-teacher``).

    A wrong class count trains silently on the framework's own ArcFace (PartialFC_V2 gets idle or missing rows).
    A wrong image count is refused, not warned about: ``train_v2.py`` plans its learning-rate schedule (warmup, then
    a decay to 0 over ``num_image // global batch * num_epoch`` steps) from it, so the whole run would follow a
    schedule for other data, seen only at its end; the key has no other use, and the message gives the number."""
    classes = int(dataset.num_classes)
    if int(cfg.num_classes) != classes:
        raise RecipeError(
            f"config.num_classes = {cfg.num_classes} but {cfg.rec} holds {classes} identities; set "
            f"config.num_classes = {classes}, the training set's"
        )
    images, given = len(dataset), cfg.get("num_image")
    if given is None or int(given) == images:
        return
    if int(given) < images:  # the decay ends early and the rate stays at 0 (PolynomialLRWarmup past total_iters)
        effect = f"reach 0 after about {int(given) / images:.0%} of the run and stay there"
    else:
        effect = f"still be at about {1 - images / int(given):.0%} of its peak when the run ends"
    raise RecipeError(
        f"config.num_image = {given} but {cfg.rec} holds {images} images: train_v2.py plans its learning-rate "
        f"schedule (warmup, then decay to 0) for num_image images an epoch, so the rate would {effect}; set "
        f"config.num_image = {images}"
    )


def unused_teacher_keys(cfg: Recipe) -> list[str]:
    """The ``config.teacher*`` keys a recipe on the framework's own loss sets, which nothing reads (the ones that
    would change a distillation, such as ``teacher_subtract_mean = True``, are refused by ``validate``): typically
    left over from a distillation recipe turned back into its ArcFace baseline. Said once, not refused: the run is
    the baseline either way."""
    if method_name(cfg) is not None:
        return []
    return [f"config.{key}" for key in cfg if str(key).startswith("teacher") and cfg.get(key) is not None]


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


# torch's words when a CUDA autocast is entered without CUDA (2.13, and the wording of older releases).
AUTOCAST_OFF = (
    r"(CUDA is not available or torch_xla is imported\. Disabling autocast"
    r"|User provided device_type of 'cuda', but CUDA is not available\. Disabling)"
)


def cpu_fp16_warning(cfg: Recipe) -> str | None:
    """The one-line warning for ``config.fp16 = True`` without CUDA, else None.

    ``config.fp16`` turns on the framework's ``torch.amp.autocast("cuda")`` and its GradScaler, both CUDA's: without
    CUDA torch leaves both off, every op runs in float32 and the loss is bit for bit that of ``config.fp16 = False``
    (``tests/arcface_torch/test_startup.py``). The key does nothing there, which is what the user needs to know."""
    import torch

    if not cfg.get("fp16") or torch.cuda.is_available():
        return None
    return (
        "warning: config.fp16 = True has no effect without CUDA: autocast and the grad scaler are CUDA-only and stay "
        "off, so this run trains in float32, exactly as with config.fp16 = False (set that to drop this warning)"
    )


def check_config(cfg: Recipe) -> Any:
    """``validate`` for the framework's ``get_config``: a bad recipe raises ``RecipeError`` (one line from rank 0
    under the patched ``train_v2.py``, see ``refusals``), and so does a val target that cannot be scored; a
    recipe that runs but slowly for a known reason, or a val target that does not exist, is said once (rank 0)."""
    from facedistill.arcface_torch import refusals

    validate(cfg)
    existing, missing = val_target_paths(cfg)
    absent = [f"warning: config.val_targets: {path} does not exist; the framework skips it" for path in missing]
    fp16 = cpu_fp16_warning(cfg)
    if fp16:
        # Our line says what torch's "Disabling autocast" says at every backbone and head forward, and why.
        warnings.filterwarnings("ignore", message=AUTOCAST_OFF, category=UserWarning)
    unused = unused_teacher_keys(cfg)
    if unused:
        loss = "config.loss is not set" if cfg.get("loss") is None else f"config.loss = {cfg.get('loss')!r}"
        verb = "is" if len(unused) == 1 else "are"
        absent.insert(
            0, f"warning: {', '.join(unused)} {verb} not used: {loss}, the framework's own ArcFace, distils no teacher"
        )
    for warning in [fp16, *absent]:
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
        if importlib.util.find_spec(f"configs.{module_name}") is None:
            raise RecipeError(missing_config(config_file, module_name))
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


def missing_config(config_file: str, module_name: str) -> str:
    """The refusal of a ``configs/NAME`` that is not there: the file looked for and the nearest names that are
    (upstream imported it and died in a ModuleNotFoundError traceback)."""
    package = importlib.import_module("configs")
    folders = [Path(folder) for folder in getattr(package, "__path__", [])] or [Path("configs")]
    names = sorted({path.stem for folder in folders for path in folder.glob("*.py")} - {"__init__", "base"})
    nearest = difflib.get_close_matches(module_name, names, n=5, cutoff=0.0)
    listed = ", ".join(f"configs/{name}" for name in nearest) or "none"
    return f"config {config_file!r} not found: there is no {folders[0] / module_name}.py; the nearest configs: {listed}"
