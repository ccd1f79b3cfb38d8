import pytest

from facedistill.config import ConfigError, load_config, save_config


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
    ],
)
def test_bad_keys_and_values_name_the_key(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_yaml_cannot_execute_code(tmp_path) -> None:
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.yaml"
    evil.write_text(f"run: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(evil)
    assert not marker.exists()


def test_missing_config_file_is_named(tmp_path) -> None:
    with pytest.raises(ConfigError, match="does-not-exist.yaml does not exist"):
        load_config(tmp_path / "does-not-exist.yaml")
