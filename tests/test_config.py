"""The strict config loader: typos, wrong types and missing keys are errors that name the dotted key."""
from dataclasses import dataclass, field
from typing import Literal, Optional

import pytest

from pafm.config import ConfigError, load_config, parse_overrides, save_config


@dataclass
class Inner:
    steps: int
    lr: float = 1e-4
    kind: Literal["fm", "pafm"] = "fm"
    t_range: Optional[tuple[float, float]] = None
    names: list[str] = field(default_factory=list)


@dataclass
class Outer:
    train: Inner
    name: str = "run"


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  steps: 3\n  lr: 0.5\n")
    cfg = load_config(Outer, path, ["train.lr=1", "train.t_range=[0.1,0.5]", "name=x", "train.names=[a,b]"])
    assert load_config(Outer, path, ["train.lr=1e-4"]).train.lr == 1e-4  # YAML 1.1 reads 1e-4 as a string
    assert cfg.train.steps == 3 and cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert cfg.train.t_range == (0.1, 0.5) and cfg.name == "x" and cfg.train.names == ["a", "b"]
    save_config(cfg, tmp_path / "resolved.yaml")
    again = load_config(Outer, tmp_path / "resolved.yaml")
    assert again == cfg


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["train.stepz=3"], "unknown config key train.stepz; did you mean train.steps?"),
        (["train.steps=a"], "train.steps: expected an integer"),
        (["train.steps=1.5"], "train.steps: expected an integer"),
        (["train.kind=flow"], "train.kind: 'flow' is not one of ['fm', 'pafm']"),
        (["train.t_range=3"], "train.t_range: expected a list"),
        (["train.t_range=[1,2,3]"], "train.t_range: expected 2 items"),
        (["train.lr=true"], "train.lr: expected a number"),
        (["train.lr=fast"], "train.lr: expected a number"),
        (["trian.steps=3"], "unknown config key trian; did you mean train?"),
        (["train"], "not of the form key=value"),
    ],
)
def test_errors_name_the_key(tmp_path, overrides, message):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  steps: 3\n")
    with pytest.raises(ConfigError) as err:
        load_config(Outer, path, overrides)
    assert message in str(err.value)


def test_missing_required_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="missing required config key train.steps"):
        load_config(Outer, None, ["train.lr=1"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(Outer, tmp_path / "nope.yaml")


def test_parse_overrides_nests():
    assert parse_overrides(["a.b.c=1", "a.d=x", "e=null"]) == {"a": {"b": {"c": 1}, "d": "x"}, "e": None}
