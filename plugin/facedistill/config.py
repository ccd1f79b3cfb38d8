"""Declarative, validated run configuration.

Configs are YAML read with ``yaml.safe_load`` into dataclasses: unknown keys, wrong types and values outside their
allowed set or range fail with the dotted key that is wrong and what would be accepted. Nothing in a config is
executed.

This module knows no registry (methods, backbones): ``facedistill.train.recipe.validate_config`` checks the names
and the values that depend on each other, above both this module and the plug-ins that import it.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config key or value is wrong; the message names the dotted key."""


class ParamError(ConfigError):
    """A hyper-parameter out of range, raised by a ``Params`` dataclass about one of its fields (``key``, as the
    dataclass names it). :func:`from_dict` re-raises it under the key the user typed in the front end that read it:
    ``method.kd_weight`` in a facedistill config, ``config.loss_params["kd_weight"]`` in an arcface_torch recipe."""

    def __init__(self, key: str, problem: str) -> None:
        self.key, self.problem = key, problem
        super().__init__(self.under(key))

    def under(self, key: str) -> str:
        """The message with the field named ``key`` ("must be ..." follows a space, ": ..." the key itself)."""
        return f"{key}{self.problem}" if self.problem.startswith(":") else f"{key} {self.problem}"


def field_key(prefix: str, name: str, item_keys: bool = False) -> str:
    """How a front end spells field ``name`` of section ``prefix``: ``prefix.name``, or ``prefix["name"]`` where the
    section is a Python dict (``item_keys``, an arcface_torch recipe's ``config.loss_params``)."""
    if not prefix:
        return name
    return f'{prefix}["{name}"]' if item_keys else f"{prefix}.{name}"


def at_least(default: Any, minimum: float, *, exclusive: bool = False) -> Any:
    """A numeric field that must be >= ``minimum`` (> with ``exclusive``), checked by ``from_dict`` when the config
    is built: such values otherwise fail mid-run (a zero ``log_every`` divides by zero after the first step) or
    only after the data is read."""
    return field(default=default, metadata={"minimum": minimum, "exclusive": exclusive})


@dataclass
class RunSection:
    output_dir: str = "runs/run"
    seed: int = 0
    device: str = "auto"


@dataclass
class DataSection:
    train: str = ""
    batch_size: int = at_least(128, 1)
    num_workers: int = at_least(2, 0)
    flip: bool = True
    # Random translation of every training image by up to this many whole pixels on each axis (0: off); the
    # teacher's cached row of the unshifted image stays the target (see facedistill.data.images.random_shift).
    shift: int = at_least(0, 0)
    skip_bad_images: bool = False
    # "identity_balanced": batches of batch_size / images_per_identity identities (triplet, EKD, RKD need pairs).
    sampler: Literal["random", "identity_balanced"] = "random"
    images_per_identity: int = 4
    # A list of identities (one folder name a line, e.g. a split's val_identities.txt from `facedistill split`) left
    # out of an identity-folder training set, so that validation pairs of those identities measure unseen people.
    # The labels of the rest stay contiguous; teacher and decoded caches are per exclusion. Not for RecordIO: pack
    # without them (`facedistill pack SRC DST --exclude FILE`).
    exclude_identities: str | None = None
    # A pairs file (LFW pairs.txt, TSV or .bin) used for validation during training. Never a test set.
    val_pairs: str | None = None
    val_images: str | None = None
    # A directory for the training images decoded once to uint8 (37.6 KB an image), built on first use; for
    # datasets that fit on a local disk, when JPEG decoding cannot keep up with the GPU.
    decoded_cache: str | None = None


@dataclass
class ModelSection:
    name: str = "mobilefacenet"
    embedding_size: int = at_least(512, 1)


@dataclass
class TeacherSection:
    # "sface", a path to an .onnx model or to a .pth/.pt checkpoint; null for methods without a teacher.
    spec: str | None = None
    cache: str | None = None
    # Class centres: "auto" takes the teacher's head when it has one, else per-class means of the cached embeddings.
    centres: Literal["auto", "head", "mean"] = "auto"
    # Subtract the mean teacher embedding (over every image and mirror) from every teacher embedding before the
    # method sees it, and build mean centres from the centred embeddings: removes the direction they all share.
    subtract_mean: bool = False
    # Mirrored training images take the teacher embedding of the mirror image (the cache holds both).
    mirror_rows: bool = True
    # An .onnx teacher's input convention, for a file that does not say it (facedistill export writes it into the
    # model's metadata, which these may repeat but not contradict): channel order, and mean and std on raw 0..255
    # values, a number or one per channel in the model's order.
    colour_order: Literal["RGB", "BGR"] | None = None
    mean: float | tuple[float, float, float] | None = None
    std: float | tuple[float, float, float] | None = None

    def __post_init__(self) -> None:
        given = [name for name in ("colour_order", "mean", "std") if getattr(self, name) is not None]
        # Set for any other teacher they would be ignored (sface and checkpoints bring their own): say so.
        if given and (self.spec is None or Path(self.spec).suffix.lower() != ".onnx"):
            raise ConfigError(
                f"teacher.{given[0]} applies to an .onnx teacher only; teacher.spec = {self.spec!r} has its own "
                "preprocessing: leave it out"
            )
        std = self.std if isinstance(self.std, tuple) else (self.std,)
        if 0 in std:
            raise ConfigError(f"teacher.std must not be zero, got {self.std!r}")

    def preprocessing(self) -> dict[str, Any]:
        """The preprocessing keys that are set, for ``facedistill.teachers.create_teacher(preprocessing=...)``."""
        values = {"colour_order": self.colour_order, "mean": self.mean, "std": self.std}
        return {name: value for name, value in values.items() if value is not None}


@dataclass
class OptimSection:
    name: Literal["sgd", "adamw"] = "sgd"
    lr: float = at_least(0.1, 0.0, exclusive=True)
    momentum: float = at_least(0.9, 0.0)
    weight_decay: float = at_least(5e-4, 0.0)
    nesterov: bool = False
    betas: tuple[float, float] = (0.9, 0.999)


@dataclass
class ScheduleSection:
    name: Literal["cosine", "step", "poly", "constant"] = "cosine"
    warmup_epochs: float = at_least(1.0, 0.0)
    warmup_start_factor: float = 0.01
    milestones: list[float] = field(default_factory=list)  # in epochs, for "step"
    gamma: float = 0.1
    power: float = 2.0
    min_lr_factor: float = 0.0


@dataclass
class TrainSection:
    epochs: float = at_least(10.0, 0.0, exclusive=True)
    amp: Literal["auto", "bf16", "fp16", "none"] = "auto"
    channels_last: bool = True
    compile: bool = False
    grad_clip: float | None = at_least(5.0, 0.0, exclusive=True)
    log_every: int = at_least(20, 1)
    checkpoint_every: int = at_least(500, 1)
    val_every_epochs: float = at_least(1.0, 0.0, exclusive=True)
    # "last" reports the final model; "best_val" the best one on data.val_pairs (never a test set).
    select: Literal["last", "best_val"] = "last"
    export_onnx: bool = True
    max_steps: int | None = at_least(None, 1)
    # With several GPUs (torchrun), BatchNorm statistics over the global batch, as on one GPU; false keeps them
    # per GPU (arcface_torch's choice), which saves a few collectives per step. CPUs have no SyncBatchNorm.
    sync_batchnorm: bool = True


# The keys of an eval.tests entry, the arguments of ``facedistill.eval.verify.load_pairs_set``.
TEST_KEYS = frozenset({"name", "pairs", "images"})


@dataclass
class EvalSection:
    # Test sets evaluated once, at the end, on the selected model: a list of {name, pairs, images}.
    tests: list[dict[str, str]] = field(default_factory=list)
    batch_size: int = at_least(256, 1)
    flip: bool = True

    def __post_init__(self) -> None:
        # The tests are read only after training: a malformed entry must fail now, not after hours.
        for index, test in enumerate(self.tests):
            unknown = sorted(set(test) - TEST_KEYS)
            if unknown:
                raise ConfigError(
                    f"eval.tests[{index}]: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(TEST_KEYS))}"
                )
            if not test.get("pairs"):
                raise ConfigError(f"eval.tests[{index}].pairs: not set (a pairs file: LFW pairs.txt, .bin or TSV)")


@dataclass
class Config:
    run: RunSection = field(default_factory=RunSection)
    data: DataSection = field(default_factory=DataSection)
    model: ModelSection = field(default_factory=ModelSection)
    # No default method: ``train`` wants it named (validate_config says so); only ``distill`` supplies one.
    method: dict[str, Any] = field(default_factory=dict)
    teacher: TeacherSection = field(default_factory=TeacherSection)
    optim: OptimSection = field(default_factory=OptimSection)
    schedule: ScheduleSection = field(default_factory=ScheduleSection)
    train: TrainSection = field(default_factory=TrainSection)
    eval: EvalSection = field(default_factory=EvalSection)

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(dataclasses.asdict(self))


def _to_plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _to_plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_plain(item) for item in value]
    return value


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it converted (ints to floats, lists to tuples)."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        return _coerce_union(value, tp, key)
    if origin is Literal:
        if value not in get_args(tp):
            allowed = ", ".join(repr(option) for option in get_args(tp))
            raise ConfigError(f"{key}: {value!r} is not one of {allowed}")
        return value
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key)
    if origin in (list, tuple):
        return _coerce_sequence(value, origin, get_args(tp), key)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        _, value_type = get_args(tp) or (str, Any)
        return {str(k): coerce(v, value_type, f"{key}.{k}") for k, v in value.items()}
    if tp in _SCALARS:
        expected, accepts = _SCALARS[tp]
        if not accepts(value):
            raise ConfigError(f"{key}: expected {expected}, got {value!r}")
        return float(value) if tp is float else value
    raise ConfigError(f"{key}: unsupported type {_type_name(tp)}")


# What each scalar annotation accepts (a YAML true is not an integer, an integer is a number).
_SCALARS: dict[type, tuple[str, Any]] = {
    bool: ("true or false", lambda value: isinstance(value, bool)),
    int: ("an integer", lambda value: isinstance(value, int) and not isinstance(value, bool)),
    float: ("a number", lambda value: isinstance(value, int | float) and not isinstance(value, bool)),
    str: ("a string", lambda value: isinstance(value, str)),
}


def _coerce_union(value: Any, tp: Any, key: str) -> Any:
    errors = []
    for option in get_args(tp):
        if option is type(None):
            if value is None:
                return None
            continue
        try:
            return coerce(value, option, key)
        except ConfigError as error:
            errors.append(str(error))
    if len(errors) == 1:
        # X | None: the one real option's own message ("is not one of ...") says what is allowed.
        raise ConfigError(errors[0])
    raise ConfigError(f"{key}: {value!r} is not a valid {_type_name(tp)}")


def _coerce_sequence(value: Any, origin: Any, args: tuple[Any, ...], key: str) -> list[Any] | tuple[Any, ...]:
    if not isinstance(value, list | tuple):
        raise ConfigError(f"{key}: expected a list, got {value!r}")
    if origin is tuple and args and args[-1] is not Ellipsis:
        if len(value) != len(args):
            raise ConfigError(f"{key}: expected {len(args)} values, got {len(value)}")
        return tuple(coerce(item, arg, f"{key}[{i}]") for i, (item, arg) in enumerate(zip(value, args, strict=True)))
    item_type = args[0] if args else Any
    items = [coerce(item, item_type, f"{key}[{i}]") for i, item in enumerate(value)]
    return tuple(items) if origin is tuple else items


def from_dict(cls: type[T], data: Any, prefix: str = "", item_keys: bool = False) -> T:
    """Build dataclass ``cls`` from a mapping, refusing unknown keys, mistyped and out-of-range values with the
    key spelled as the front end spells it (:func:`field_key`)."""
    where = prefix or "config"
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - fields)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(fields))}")
    values = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if f.name in data:
            key = field_key(prefix, f.name, item_keys)
            values[f.name] = _check_minimum(coerce(data[f.name], hints[f.name], key), f.metadata, key)
    try:
        return cls(**values)
    except ParamError as error:
        raise ConfigError(error.under(field_key(prefix, error.key, item_keys))) from None


def _check_minimum(value: Any, metadata: Any, key: str) -> Any:
    """``value`` when it meets the field's ``at_least`` bound (or has none, or is None); else a ConfigError."""
    if "minimum" not in metadata or value is None:
        return value
    minimum, exclusive = metadata["minimum"], metadata["exclusive"]
    if value < minimum or (exclusive and value == minimum):
        raise ConfigError(f"{key}: must be {'>' if exclusive else '>='} {minimum:g}, got {value!r}")
    return value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides; values are parsed as YAML scalars/lists (never evaluated as code)."""
    for override in overrides:
        if "=" not in override:
            raise ConfigError(f"override {override!r} must look like section.key=value")
        dotted, raw = override.split("=", 1)
        node = data
        parts = dotted.strip().split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {override!r}: {part} is not a section")
            node = child
        try:
            node[parts[-1]] = yaml.safe_load(raw)
        except yaml.YAMLError as error:
            raise ConfigError(f"override {override!r}: the value is not valid YAML: {_yaml_problem(error)}") from None
    return data


def _yaml_problem(error: yaml.YAMLError) -> str:
    """A YAML error on one line (PyYAML's own text spans several, with a caret under the spot)."""
    if isinstance(error, yaml.MarkedYAMLError) and error.problem:
        mark = error.problem_mark
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        return f"{error.problem}{where}"
    return " ".join(str(error).split())


def read_config_data(path: str | Path | None = None, overrides: list[str] | None = None) -> dict[str, Any]:
    """The YAML file (if any) with ``overrides`` applied, as plain data, not yet checked.

    Separate from ``load_config`` so that a command can add a default where the recipe and the overrides say
    nothing (``distill``'s method) without reading the file twice.
    """
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        try:
            loaded = yaml.safe_load(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except yaml.YAMLError as error:
            raise ConfigError(f"config file {path} is not valid YAML: {_yaml_problem(error)}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping of sections")
        data = loaded or {}
    return apply_overrides(data, overrides or [])


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """The config of the YAML file (if any) with ``overrides`` applied, every section type- and range-checked.

    The method is not required here (a ``compare`` recipe names none; its students do): a run checks it, with the
    names and the values that depend on each other, in ``facedistill.train.recipe.validate_config``.
    """
    return from_dict(Config, read_config_data(path, overrides))


def save_config(config: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
