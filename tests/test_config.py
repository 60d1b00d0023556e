import math
from dataclasses import dataclass, field

import pytest

from rf_core.config import (
    ConfigError,
    Schedule,
    ScheduleSpec,
    build,
    load_config,
    parse_override,
    save_config,
    schedule_field,
    to_dict,
)


@dataclass
class Inner:
    size: int = 4
    """a size"""
    scale: float = 1.0
    names: list[str] = field(default_factory=lambda: ["a"])

    def __post_init__(self):
        if self.size <= 0:
            raise ValueError(f"size must be positive, got {self.size}")


@dataclass
class Outer:
    inner: Inner = field(default_factory=Inner)
    flag: bool = False
    mode: str = "x"
    weight: ScheduleSpec = schedule_field(0.5)
    maybe: int | None = None


def test_schedule_constant_linear_log():
    assert Schedule.parse(2.0)(0) == 2.0 and Schedule.parse(2)(10**6) == 2.0
    s = Schedule.parse([100, 1.0, 3.0, 300])
    assert s(0) == 1.0 and s(100) == 1.0 and s(200) == pytest.approx(2.0) and s(10**6) == 3.0
    g = Schedule.parse([0, 1e-2, 1e-4, 100, "log"])
    assert g(50) == pytest.approx(1e-3) and g(100) == pytest.approx(1e-4)
    # a step change when start_step == end_step
    jump = Schedule.parse([10, 0.0, 1.0, 10])
    assert jump(10) == 0.0 and jump(11) == 1.0
    assert Schedule.parse(s.to_spec()) == s and Schedule.parse(g.to_spec()) == g


@pytest.mark.parametrize("spec, msg", [
    ([1, 2, 3], "expected a number"),
    ([10, 1.0, 2.0, 5], "before start_step"),
    ([0, 0.0, 1.0, 10, "log"], "positive"),
    ([0, 1.0, 1.0, 10, "cubic"], "'linear' or 'log'"),
    (True, "expected a number"),
    ("fast", "expected a number"),
])
def test_schedule_errors(spec, msg):
    with pytest.raises(ConfigError, match=msg):
        Schedule.parse(spec, "w")


def test_build_defaults_and_nested():
    cfg = build(Outer, {"inner": {"size": 8, "scale": 2}, "weight": [0, 1, 2, 10]})
    assert cfg.inner.size == 8 and cfg.inner.scale == 2.0 and isinstance(cfg.inner.scale, float)
    assert Schedule.parse(cfg.weight)(5) == pytest.approx(1.5)
    assert build(Outer) == Outer()


@pytest.mark.parametrize("data, msg", [
    ({"inner": {"sise": 3}}, r"unknown config key 'inner.sise'.*valid keys under 'inner'"),
    ({"bogus": 1}, r"unknown config key 'bogus'"),
    ({"inner": {"size": "big"}}, r"inner.size: expected an integer"),
    ({"inner": {"size": 1.5}}, r"inner.size: expected an integer"),
    ({"flag": "yes"}, r"flag: expected true or false"),
    ({"inner": {"scale": True}}, r"inner.scale: expected a number"),
    ({"inner": 3}, r"inner: expected a mapping"),
    ({"inner": {"names": "a"}}, r"inner.names: expected a list"),
    ({"inner": {"size": -1}}, r"inner: size must be positive"),
    ({"weight": [1, 2]}, r"weight: expected a number or"),
    ({"maybe": "x"}, r"maybe: expected"),
])
def test_build_errors_name_the_key(data, msg):
    with pytest.raises(ConfigError, match=msg):
        build(Outer, data)


def test_overrides_and_files_merge_in_order(tmp_path):
    a = tmp_path / "a.yaml"
    a.write_text("inner:\n  size: 16\n  scale: 3.0\nmode: y\n")
    b = tmp_path / "b.yaml"
    b.write_text("inner:\n  size: 32\n")
    cfg = load_config(Outer, [a, b], ["inner.scale=0.25", "flag=true", "weight=[0,1,0,5,linear]",
                                      "maybe=null"])
    assert (cfg.inner.size, cfg.inner.scale, cfg.mode, cfg.flag) == (32, 0.25, "y", True)
    assert cfg.weight == [0, 1, 0, 5, "linear"] and cfg.maybe is None
    assert parse_override("a.b=1e-3") == {"a": {"b": 1e-3}}
    with pytest.raises(ConfigError, match="dotted.key=value"):
        parse_override("novalue")
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(Outer, [tmp_path / "missing.yaml"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(Outer, [bad])


def test_save_and_reload_round_trip(tmp_path):
    cfg = build(Outer, {"inner": {"size": 5, "names": ["p", "q"]}, "weight": [0, 1e-2, 1e-3, 9,
                                                                                  "log"]})
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(Outer, [tmp_path / "config.yaml"])
    assert again == cfg and to_dict(again) == to_dict(cfg)
    assert math.isclose(Schedule.parse(again.weight)(9), 1e-3)
