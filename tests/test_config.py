"""Config: YAML + ``--key value`` overrides, nested dotted keys, and clear errors."""
from __future__ import annotations

import dataclasses

import pytest

from megarec.config import (ConfigError, DataConfig, field, load_config, parse_overrides, save_config, to_dict,
                            validate)


@dataclasses.dataclass
class Optim:
    lr: float = field(1e-3, min=0.0, max=1.0, help="peak learning rate")
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999], min=0.0, max=1.0)
    schedule: str = field("cosine", choices=("cosine", "linear", "constant"))


@dataclasses.dataclass
class Model:
    levels: list[int] = field(default_factory=lambda: [256, 256, 256], min=1)
    layers: int = field(6, min=1, max=48)
    name: str | None = field(None)
    tied: bool = field(False)


@dataclasses.dataclass
class Run:
    model: Model = field(default_factory=Model)
    optim: Optim = field(default_factory=Optim)
    data: DataConfig = field(default_factory=DataConfig)
    epochs: int = field(10, min=1)
    warmup: int = field(0, min=0)

    def check(self) -> None:
        if self.warmup > self.epochs:
            raise ConfigError(f"warmup ({self.warmup}) must not exceed epochs ({self.epochs})")


def write(tmp_path, text: str):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def test_defaults_yaml_then_overrides(tmp_path):
    assert load_config(Run) == Run()
    path = write(tmp_path, "epochs: 20\nmodel:\n  layers: 4\n  levels: [128, 64]\noptim:\n  lr: 3e-4\n"
                           "data:\n  max_len: 50\n  text_fields: [title, features]\n")
    cfg = load_config(Run, path, ["--optim.lr", "0.01", "--model.tied=true", "--model.name", "t5",
                                  "--data.kcore", "5", "--optim.betas", "0.8,0.9"])
    assert cfg.epochs == 20 and cfg.model.layers == 4 and cfg.model.levels == [128, 64]
    assert cfg.optim.lr == 0.01  # override beats the YAML
    assert isinstance(cfg.optim.lr, float) and cfg.model.tied is True and cfg.model.name == "t5"
    assert cfg.data.max_len == 50 and cfg.data.text_fields == ["title", "features"] and cfg.data.kcore == 5
    assert cfg.optim.betas == [0.8, 0.9]
    assert load_config(Run, path, [("model.levels", "[8, 8, 8, 8]")]).model.levels == [8, 8, 8, 8]
    assert load_config(Run, None, ["--model.name", "none"]).model.name is None
    assert load_config(Run, None, ["--data.text_fields", "none"]).data.text_fields is None
    assert DataConfig().kcore is None and DataConfig().text_fields is None  # the reader's per-format defaults


def test_save_and_reload(tmp_path):
    cfg = load_config(Run, None, ["--model.levels", "32,32", "--optim.schedule", "linear"])
    save_config(cfg, tmp_path / "saved.yaml")
    assert load_config(Run, tmp_path / "saved.yaml") == cfg
    assert to_dict(cfg)["model"]["levels"] == [32, 32]


def test_parse_overrides():
    assert parse_overrides(["--a.b", "1", "--c-d=x=y"]) == [("a.b", "1"), ("c_d", "x=y")]
    with pytest.raises(ConfigError, match="--a needs a value"):
        parse_overrides(["--a"])
    with pytest.raises(ConfigError, match="expected --key value, got 'b'"):
        parse_overrides(["b", "1"])


@pytest.mark.parametrize("overrides, match", [
    (["--epoch", "3"], r"unknown key 'epoch'; valid keys: data, epochs, model, optim, warmup"),
    (["--model.layer", "3"], r"unknown key 'model.layer'; valid keys: model.layers, model.levels, model.name, model.tied"),
    (["--epochs.x", "3"], r"'epochs' has no sub-keys"),
    (["--epochs", "three"], r"epochs: expected an integer, got 'three'"),
    (["--epochs", "2.5"], r"epochs: expected an integer"),
    (["--optim.lr", "fast"], r"optim.lr: expected a number, got 'fast'"),
    (["--model.tied", "maybe"], r"model.tied: expected true/false, got 'maybe'"),
    (["--model.levels", "8,x"], r"model.levels\[1\]: expected an integer, got 'x'"),
    (["--epochs", "0"], r"epochs: 0 is below the minimum 1"),
    (["--model.layers", "64"], r"model.layers: 64 is above the maximum 48"),
    (["--optim.lr", "-1e-3"], r"optim.lr: -0.001 is below the minimum 0.0"),
    (["--optim.betas", "0.9,1.5"], r"optim.betas: 1.5 is above the maximum 1.0"),
    (["--model.levels", "256,0"], r"model.levels: 0 is below the minimum 1"),
    (["--optim.schedule", "step"], r"optim.schedule: 'step' is not one of 'cosine', 'linear', 'constant'"),
    (["--data.kcore", "-1"], r"data.kcore: -1 is below the minimum 0"),
    (["--warmup", "11"], r"warmup \(11\) must not exceed epochs \(10\)"),
    (["--model", "3"], r"model: expected a mapping of levels, layers, name, tied"),
])
def test_override_errors(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(Run, None, overrides)


@pytest.mark.parametrize("text, match", [
    ("epochs: 3\nmodle:\n  layers: 2\n", r"run\.yaml: unknown key 'modle'; valid keys: data, epochs, model"),
    ("model:\n  depth: 2\n", r"run\.yaml: unknown key 'model.depth'; valid keys: model.layers"),
    ("model:\n  layers: '2'\n", r"run\.yaml: model.layers: expected an integer, got '2'"),
    ("model:\n  layers: true\n", r"run\.yaml: model.layers: expected an integer, got True"),
    ("model:\n  levels: 256\n", r"run\.yaml: model.levels: expected a list, got 256"),
    ("optim:\n  schedule: Cosine\n", r"run\.yaml: optim.schedule: 'Cosine' is not one of"),
    ("epochs: [1\n", r"run\.yaml: not valid YAML"),
    ("- 1\n- 2\n", r"run\.yaml: top level must be a mapping"),
])
def test_yaml_errors(tmp_path, text, match):
    with pytest.raises(ConfigError, match=match):
        load_config(Run, write(tmp_path, text))


def test_missing_file_and_validate_in_code(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(Run, tmp_path / "nope.yaml")
    assert load_config(Run, write(tmp_path, "")) == Run()  # an empty file is all defaults
    cfg = Run()
    cfg.model.layers = 0
    with pytest.raises(ConfigError, match="model.layers: 0 is below the minimum 1"):
        validate(cfg)
