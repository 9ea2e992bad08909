"""The config loader: YAML + overrides, type checks, nested sub-configs (mapping or dotted keys),
errors naming the full key, validation prefixes, and a saved config reloading to the same value."""
from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import yaml

from tmd_train.engine.config import config_from_dict, config_key_table, field_docs, load_config, save_config
from tmd_train.errors import ConfigError, MissingFileError


@dataclass(frozen=True)
class Inner:
    """Inner options.

    Attributes:
        scale: the scale, which must be
            positive.
        kind: "a" or "b".
    """

    scale: float = 3.0
    kind: str = "a"
    hidden: str = field(default="x", metadata={"set_by": "method"})

    def __post_init__(self) -> None:
        if not self.scale > 0:
            raise ValueError(f"scale must be > 0, got {self.scale}")
        if self.kind not in ("a", "b"):
            raise ValueError(f"need kind in (a, b), got {self.kind!r}")


@dataclass
class Outer:
    """Outer options.

    Attributes:
        steps, lr: the step count and rate.
        inner: the inner options.
    """

    steps: int = 1
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.99)
    teacher: dict | None = None
    inner: Inner = field(default_factory=Inner)

    def validate(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")


def test_nested_from_yaml_mapping_and_dotted_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump({"steps": 3, "inner": {"scale": 2, "kind": "b"}, "teacher": {"n": 1}}))
    cfg = load_config(Outer, f, ["inner.scale=5e-1", "lr=3e-5", "teacher.m=2"])
    assert cfg.inner == Inner(scale=0.5, kind="b") and isinstance(cfg.inner.scale, float)
    assert (cfg.steps, cfg.lr, cfg.teacher) == (3, 3e-5, {"n": 1, "m": 2})
    assert load_config(Outer).inner == Inner()                            # default sub-config
    assert config_from_dict(Outer, {"inner": Inner(scale=4.0)}).inner.scale == 4.0


def test_errors_name_the_key(tmp_path):
    cases = [(["inner.scle=1"], "unknown config key 'inner.scle' for Inner"),
             (["inner.hidden=y"], "unknown config key 'inner.hidden'"),          # set by code, not a key
             (["inner.scale=abc"], "inner.scale: expected a float"),
             (["inner.scale=0"], "inner.scale must be > 0"),
             (["inner.kind=c"], "inner: need kind"),
             (["inner=3"], "inner: expected a mapping"),
             (["stepz=1"], "unknown config key 'stepz' for Outer"),
             (["steps=0"], "^steps must be >= 1"),
             (["betas=[1]"], "betas: expected 2 values"),
             (["steps.x=1"], "steps.x: steps is not a mapping")]
    for overrides, match in cases:
        with pytest.raises(ValueError, match=match):
            load_config(Outer, None, overrides)
    f = tmp_path / "bad.yaml"
    f.write_text(yaml.safe_dump({"inner": {"scale": 1, "kid": "a"}}))
    with pytest.raises(ValueError, match="unknown config key 'inner.kid'"):
        load_config(Outer, f)
    with pytest.raises(FileNotFoundError):
        load_config(Outer, tmp_path / "missing.yaml")


def test_saved_config_reloads(tmp_path):
    cfg = load_config(Outer, None, ["inner.kind=b", "teacher.a=[1, 2]", "betas=[0.8, 0.9]"])
    save_config(cfg, tmp_path / "config.yaml")
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert saved["inner"] == {"scale": 3.0, "kind": "b"}                  # nested; no set_by field
    assert load_config(Outer, tmp_path / "config.yaml") == cfg


def test_user_errors_name_the_file_and_line(tmp_path):
    """Config errors are ConfigErrors (still ValueErrors); a YAML syntax error names the file and line."""
    f = tmp_path / "broken.yaml"
    f.write_text("steps: 2\nlr: 1e-3\nbetas: [0.9, 0.99\n")
    with pytest.raises(ConfigError, match=r"broken\.yaml: YAML syntax error, line 4.*flow sequence at line 3"):
        load_config(Outer, f)
    f.write_text("steps: 2\n  lr: 1\n")
    with pytest.raises(ConfigError, match=r"broken\.yaml: YAML syntax error, line 2, column 5"):
        load_config(Outer, f)
    with pytest.raises(ConfigError, match=r"override 'betas=\[1,': the value is not valid YAML"):
        load_config(Outer, None, ["betas=[1,"])
    with pytest.raises(MissingFileError, match="is not a file"):
        load_config(Outer, tmp_path)
    with pytest.raises(ValueError):                                   # ConfigError is a ValueError
        load_config(Outer, None, ["steps=0"])


def test_key_meanings_come_from_the_attributes_sections():
    assert field_docs(Outer) == {"steps": "the step count and rate.", "lr": "the step count and rate.",
                                 "inner": "the inner options."}
    assert field_docs(Inner) == {"scale": "the scale, which must be positive.", "kind": '"a" or "b".'}
    assert config_key_table(Outer) == [
        ("steps", "1", "the step count and rate."), ("lr", "0.001", "the step count and rate."),
        ("betas", "[0.9, 0.99]", ""), ("teacher", "null", ""),
        ("inner.scale", "3.0", "the scale, which must be positive."), ("inner.kind", "a", '"a" or "b".')]
