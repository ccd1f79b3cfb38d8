import dataclasses

import pytest

from facedistill.config import Config, ConfigError, load_config, read_config_data, save_config
from facedistill.distill import METHODS
from facedistill.train.recipe import validate_config


def test_defaults_and_overrides(tmp_path) -> None:
    config = load_config(None, ["train.epochs=3", "optim.betas=[0.8, 0.95]", "method.name=margin_distillation"])
    assert config.train.epochs == 3.0 and isinstance(config.train.epochs, float)
    assert config.optim.betas == (0.8, 0.95)
    save_config(config, tmp_path / "resolved.yaml")
    assert load_config(tmp_path / "resolved.yaml").to_dict() == config.to_dict()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.epoch=3", "train: unknown key\\(s\\) epoch; allowed: amp"),
        ("optim.name=adam", "optim.name: 'adam' is not one of 'sgd', 'adamw'"),
        ("data.batch_size=12.5", "data.batch_size: expected an integer"),
        ("train.channels_last=maybe", "train.channels_last: expected true or false"),
        ("optim.betas=[0.9]", "optim.betas: expected 2 values"),
        ("nonsense.key=1", "config: unknown key\\(s\\) nonsense"),
        ("train.log_every=0", "train.log_every: must be >= 1, got 0"),
        ("train.checkpoint_every=-5", "train.checkpoint_every: must be >= 1, got -5"),
        ("optim.lr=0", "optim.lr: must be > 0, got 0.0"),
        ("data.batch_size=0", "data.batch_size: must be >= 1"),
        ("train.max_steps=0", "train.max_steps: must be >= 1"),
        ("train.grad_clip=0", "train.grad_clip: must be > 0"),
        ("eval.tests=[{name: lfw}]", "eval.tests\\[0\\].pairs: not set"),
        ("eval.tests=[{pairs: p.txt, image: x}]", "eval.tests\\[0\\]: unknown key\\(s\\) image; allowed: images"),
        ("train.epochs=[1", "override 'train.epochs=\\[1': the value is not valid YAML: .*\\(line 1, column 3\\)$"),
    ],
)
def test_bad_keys_and_values_name_the_key(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_yaml_cannot_execute_code(tmp_path) -> None:
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.yaml"
    evil.write_text(f"run: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(
        ConfigError, match="not valid YAML: could not determine a constructor .* \\(line 1, column 6\\)$"
    ):
        load_config(evil)
    assert not marker.exists()


def test_missing_config_file_is_named(tmp_path) -> None:
    with pytest.raises(ConfigError, match="does-not-exist.yaml does not exist"):
        load_config(tmp_path / "does-not-exist.yaml")


def test_no_method_is_named_by_default() -> None:
    assert Config().method == {}
    assert load_config(None, ["data.train=faces"]).method == {}
    # distill's default goes into the data, before the config is built: the recipe's own keys stay.
    assert read_config_data(None, ["method.scale=16"]) == {"method": {"scale": 16}}


def _valid(*overrides: str) -> Config:
    return load_config(None, ["data.train=faces", "teacher.cache=cache", *overrides])


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ((), "^method.name: not set; set method.name to one of adadistill, angular, "),
        (("method.name=foo",), "^method.name: unknown method 'foo'; known: " + ", ".join(METHODS.names()) + "$"),
        (("method.name=[kd]",), "^method.name: unknown method \\['kd'\\]; known: "),
        (("method.name=kd", "method.foo=1"), "^method: unknown key\\(s\\) foo; allowed: kd_weight, margin, "),
        (("method.name=kd", "method.temperature=warm"), "^method.temperature: expected a number, got 'warm'"),
        (("method.name=kd", "method.temperature=-1"), "^method.temperature must be > 0"),
        (("method.name=ekd",), "set data.sampler=identity_balanced"),
        (("method.name=kd", "teacher.cache=null"), "reads the teacher's embeddings from a cache: set teacher.cache"),
        (("method.name=arcface", "data.train=''"), "^data.train: not set"),
        (("method.name=arcface", "model.name=resnet9000"), "^model.name: unknown backbone 'resnet9000'; known: "),
        (("method.name=arcface", "train.select=best_val"), "best_val needs data.val_pairs"),
        (("method.name=kd", "teacher.subtract_mean=true", "teacher.centres=head"), "set teacher.centres=mean"),
        (("method.name=arcface", "run.device=gpu"), "^run.device: 'gpu' is not a device"),
    ],
)
def test_validate_config_names_what_to_fix_in_one_line(overrides, message) -> None:
    with pytest.raises(ConfigError, match=message) as caught:
        validate_config(_valid(*overrides))
    assert "\n" not in str(caught.value)


def test_validate_config_accepts_every_method_with_its_defaults() -> None:
    for name in METHODS.names():
        balanced = ["data.sampler=identity_balanced"] if METHODS.get(name).needs_identity_balanced_batches else []
        method_cls, params = validate_config(_valid(f"method.name={name}", *balanced))
        assert method_cls is METHODS.get(name) and dataclasses.is_dataclass(params)
    # Methods without a teacher need no cache.
    validate_config(load_config(None, ["data.train=faces", "method.name=arcface", "run.device=cpu"]))


def test_a_params_range_check_is_named_by_the_front_end_that_read_it() -> None:
    from dataclasses import dataclass

    from facedistill.config import ParamError, field_key, from_dict

    @dataclass
    class Params:
        weight: float = 1.0

        def __post_init__(self) -> None:
            if self.weight < 0:
                raise ParamError("weight", f"must be >= 0, got {self.weight}")

    with pytest.raises(ConfigError, match=r"^method\.weight must be >= 0, got -1\.0$"):
        from_dict(Params, {"weight": -1.0}, prefix="method")
    with pytest.raises(ConfigError, match=r'^config\.loss_params\["weight"\] must be >= 0, got -1\.0$'):
        from_dict(Params, {"weight": -1.0}, prefix="config.loss_params", item_keys=True)
    with pytest.raises(ParamError, match=r"^weight must be >= 0"):
        Params(weight=-1.0)
    assert field_key("", "weight") == "weight" and field_key("a.b", "c") == "a.b.c"
