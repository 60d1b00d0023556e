import dataclasses
import math
import re
import typing
from dataclasses import dataclass, field, fields

import pytest

from rf_core.config import (
    ConfigError,
    Schedule,
    ScheduleSpec,
    bounded,
    build,
    build_schedules,
    dump_yaml,
    field_range,
    load_config,
    parse_override,
    parse_yaml,
    preset_names,
    save_config,
    schedule_field,
    to_dict,
)
from rf_core.jobs.job_config import ReconstructJobConfig, load_job_config


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
    cfg = load_config(Outer, files=[a, b], overrides=["inner.scale=0.25", "flag=true",
                                                      "weight=[0,1,0,5,linear]", "maybe=null"])
    assert (cfg.inner.size, cfg.inner.scale, cfg.mode, cfg.flag) == (32, 0.25, "y", True)
    assert cfg.weight == [0, 1, 0, 5, "linear"] and cfg.maybe is None
    assert parse_override("a.b=1e-3") == {"a": {"b": 1e-3}}
    with pytest.raises(ConfigError, match="dotted.key=value"):
        parse_override("novalue")
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(Outer, files=[tmp_path / "missing.yaml"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(Outer, files=[bad])


def test_save_and_reload_round_trip(tmp_path):
    cfg = build(Outer, {"inner": {"size": 5, "names": ["p", "q"]}, "weight": [0, 1e-2, 1e-3, 9,
                                                                                  "log"]})
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(Outer, files=[tmp_path / "config.yaml"])
    assert again == cfg and to_dict(again) == to_dict(cfg)
    assert math.isclose(Schedule.parse(again.weight)(9), 1e-3)


# ---------------------------------------------------------------------------- finite and ranges


@dataclass
class Ranged:
    every: int = bounded(10, lo=1)
    """an interval in steps"""
    p: float = bounded(0.5, lo=0, hi=1)
    decay: float = bounded(0.9, lo=0, hi=1, lo_open=True)
    pair: list[float] = bounded([1.0, 2.0], lo=0, lo_open=True)
    clip: float | None = bounded(None, lo=0, lo_open=True)
    lr: ScheduleSpec = schedule_field(1e-2, "a learning rate", lo=0, lo_open=True)
    scale: float = 1.0


@pytest.mark.parametrize("data, msg", [
    ({"scale": math.inf}, r"^scale: expected a finite number, got inf$"),
    ({"scale": "-inf"}, r"^scale: expected a finite number, got -inf$"),
    ({"scale": math.nan}, r"^scale: expected a finite number, got nan$"),
    ({"pair": [1.0, math.inf]}, r"^pair\[1\]: expected a finite number, got inf$"),
    ({"clip": math.nan}, r"^clip: expected a finite number, got nan$"),
    ({"lr": math.inf}, r"^lr: expected a finite number, got inf$"),
    ({"lr": [0, 1e-2, math.nan, 10]}, r"^lr\[2\]: expected a finite number, got nan$"),
    ({"lr": [0, math.inf, 1e-3, 10, "log"]}, r"^lr\[1\]: expected a finite number, got inf$"),
    ({"lr": [0, 1e-2, 1e-3, math.inf]}, r"^lr: schedule entries must be numbers"),
])
def test_non_finite_values_are_rejected(data, msg):
    with pytest.raises(ConfigError, match=msg):
        build(Ranged, data)


def test_non_finite_overrides_and_schedules():
    with pytest.raises(ConfigError, match=r"^recon\.weights\.sds: expected a finite number, "
                                          r"got inf$"):
        load_job_config("tiny", [], ["recon.weights.sds=inf"])
    with pytest.raises(ConfigError, match=r"^recon\.weights\.sds\[1\]: expected a finite"):
        load_job_config("tiny", [], ["recon.weights.sds=[0, .nan, 1.0, 100]"])
    with pytest.raises(ConfigError, match=r"^recon\.camera\.random\.radius_range\[0\]: expected "
                                          r"a finite number"):
        load_job_config("tiny", [], ["recon.camera.random.radius_range=[-.inf, 2.0]"])
    with pytest.raises(ConfigError, match="w: expected a finite number, got inf"):
        Schedule.parse(math.inf, "w")
    with pytest.raises(ConfigError, match=r"w\[2\]: expected a finite number, got nan"):
        Schedule.parse([0, 1.0, math.nan, 10], "w")


@pytest.mark.parametrize("data, msg", [
    ({"every": 0}, r"^every: must be >= 1, got 0$"),
    ({"p": 1.5}, r"^p: must be in \[0, 1\], got 1.5$"),
    ({"decay": 0}, r"^decay: must be in \(0, 1\], got 0.0$"),
    ({"pair": [0.0, 1.0]}, r"^pair\[0\]: must be > 0, got 0.0$"),
    ({"clip": -1}, r"^clip: must be > 0, got -1.0$"),
    ({"lr": 0}, r"^lr: must be > 0, got 0.0$"),
    ({"lr": [0, 1e-2, -1e-3, 10]}, r"^lr\[2\]: must be > 0, got -0.001$"),
])
def test_declared_ranges_name_the_key_and_the_bound(data, msg):
    with pytest.raises(ConfigError, match=msg):
        build(Ranged, data)


def test_ranges_accept_their_ends_and_none():
    cfg = build(Ranged, {"every": 1, "p": 1, "decay": 1, "clip": None, "lr": [0, 1, 1e-9, 5]})
    assert (cfg.every, cfg.p, cfg.decay, cfg.clip) == (1, 1.0, 1.0, None)
    ranges = {f.name: field_range(f) for f in fields(Ranged)}
    assert ranges["every"] == (1, None, False, False) and ranges["scale"] is None
    assert ranges["lr"] == (0, None, True, False) and field_range(fields(Outer)[0]) is None
    assert Ranged().pair == [1.0, 2.0] and Ranged().pair is not Ranged().pair


def test_job_config_ranges():
    for override, msg in [
        ("checkpoint_every=0", r"^checkpoint_every: must be >= 1, got 0$"),
        ("export.mesh_resolution=1", r"^export\.mesh_resolution: must be >= 8, got 1$"),
        ("recon.weights.sds=-1", r"^recon\.weights\.sds: must be >= 0"),
        ("recon.lr=[0, 0.01, 0, 100]", r"^recon\.lr\[2\]: must be > 0"),
        ("recon.sds.t_max=1.5", r"^recon\.sds\.t_max: must be in \[0, 1\]"),
        ("recon.sds.t_min=0.99", r"t_min 0.99 is above t_max 0.98"),
        ("recon.camera.random.elevation_range=[-30, 100]", r"elevation_range"),
        ("input.size=4", r"^input\.size: must be >= 8, got 4$"),
    ]:
        with pytest.raises(ConfigError, match=msg):
            load_job_config("tiny", [], [override])
    # a scheduled t_max may cross a constant t_min; SDSConfig.at() checks each step
    load_job_config("tiny", [], ["recon.sds.t_min=0.4", "recon.sds.t_max=[0, 0.98, 0.3, 100]"])


def _ranged_fields(cls, prefix=""):
    """(dotted key, field, type) of every field with a declared range, recursively."""
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(hints[f.name]):
            yield from _ranged_fields(hints[f.name], f"{key}.")
        elif field_range(f) is not None:
            yield key, f, hints[f.name]


def _outside(bound: float, below: bool, is_open: bool, integer: bool) -> float:
    if is_open:
        return int(bound) if integer else float(bound)
    if integer:
        return int(bound) - 1 if below else int(bound) + 1
    step = max(abs(bound), 1.0) * 1e-6
    return bound - step if below else bound + step


def _nest(key: str, value) -> dict:
    out: dict = {}
    node = out
    *parents, last = key.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value
    return out


def test_every_declared_range_rejects_just_outside_and_accepts_the_default():
    default = to_dict(ReconstructJobConfig())
    walked = list(_ranged_fields(ReconstructJobConfig))
    assert len(walked) > 60
    keys = {k for k, _, _ in walked}
    assert {"checkpoint_every", "export.mesh_resolution", "recon.lr", "recon.weights.sds",
            "recon.field.grid.log2_hashmap_size", "recon.camera.random.fov_range",
            "inversion.augment.hflip_p", "input.size", "recon.sds.t_min"} <= keys
    for key, f, tp in walked:
        value = default
        for part in key.split("."):
            value = value[part]
        build(ReconstructJobConfig, _nest(key, value))  # the default is inside
        rng = field_range(f)
        item_tp = typing.get_args(tp)[0] if typing.get_origin(tp) in (list, tuple) else tp
        integer = item_tp is int
        for bound, below, is_open in ((rng.lo, True, rng.lo_open), (rng.hi, False, rng.hi_open)):
            if bound is None:
                continue
            bad = _outside(bound, below, is_open, integer)
            if isinstance(value, (list, tuple)) and not f.metadata.get("schedule"):
                bad = [bad, *value[1:]] if below else [*value[:-1], bad]
            with pytest.raises(ConfigError, match=re.escape(key.rsplit(".", 1)[-1])):
                build(ReconstructJobConfig, _nest(key, bad))
            if f.metadata.get("schedule"):  # both ends of a schedule are checked
                for at in (1, 2):
                    inside = Schedule.parse(value).start_value
                    spec = [0, inside, inside, 10]
                    spec[at] = bad
                    with pytest.raises(ConfigError, match=re.escape(f"{key}[{at}]")):
                        build(ReconstructJobConfig, _nest(key, spec))


@pytest.mark.parametrize("preset", preset_names())
def test_presets_build(preset):
    cfg = load_job_config(preset)
    assert cfg.recon.steps >= 1 and cfg.checkpoint_every >= 1


# ---------------------------------------------------------------------------- the one door


def test_preset_names_and_load_config_presets_equal_the_job_loader():
    assert {"tiny", "realfusion"} <= set(preset_names())
    for name in preset_names():
        cfg = load_config(ReconstructJobConfig, presets=[name], overrides=["recon.steps=7"])
        assert cfg == load_job_config(name, [], ["recon.steps=7"])
        assert load_config(ReconstructJobConfig, presets=name) == load_job_config(name)
    with pytest.raises(ConfigError, match=r"unknown preset 'nope'; choose one of .*tiny"):
        load_config(ReconstructJobConfig, presets=["nope"])


def test_presets_then_files_then_overrides_merge_in_order(tmp_path):
    f = tmp_path / "f.yaml"
    f.write_text("recon: {steps: 11, sds_size: 48}\n")
    cfg = load_config(ReconstructJobConfig, presets=["tiny"], files=[f],
                      overrides=["recon.steps=12"], base={"recon": {"input_size": 40}})
    assert (cfg.recon.steps, cfg.recon.sds_size) == (12, 48)
    assert cfg.recon.input_size == 64  # the preset wins over base
    assert cfg.recon.lr == [0, 2e-2, 2e-3, 300, "log"]  # the rest of the preset


def test_load_config_takes_keywords_only(tmp_path):
    a = tmp_path / "a.yaml"
    a.write_text("mode: z\n")
    assert load_config(Outer, files=[a], overrides=["flag=true"]).mode == "z"
    assert load_config(Outer, overrides=["flag=true"], base={"mode": "q"}).mode == "q"
    with pytest.raises(TypeError):
        load_config(Outer, [a])


def test_parse_yaml_reads_exponent_numbers_as_floats():
    data = parse_yaml("x: 1e-3\ny: -2E+2\nlr: [0, 1e-2, 1e-3, 300, log]\nn: 5\ns: 1e\n")
    assert data == {"x": 1e-3, "y": -200.0, "lr": [0, 1e-2, 1e-3, 300, "log"], "n": 5,
                    "s": "1e"}
    assert [type(v) for v in data["lr"]] == [int, float, float, int, str]
    assert parse_yaml("") is None and parse_yaml("[1, 2]") == [1, 2]
    with pytest.raises(ConfigError, match=r"^my file is not valid YAML at line 2$"):
        parse_yaml("a: [1, 2\n", "my file")


def test_dump_yaml_round_trips_configs_and_plain_data():
    for name in preset_names():
        cfg = load_job_config(name)
        text = dump_yaml(cfg)
        assert text == dump_yaml(to_dict(cfg))  # a dataclass tree or its dict: the same text
        again = build(ReconstructJobConfig, parse_yaml(text))
        assert again == cfg and dump_yaml(again) == text
    data = {"b": 1, "a": [0, 1e-3, "log"], "p": None}
    assert list(parse_yaml(dump_yaml(data))) == ["b", "a", "p"]  # key order kept
    assert parse_yaml(dump_yaml(data)) == data


def test_schedules_are_stored_as_plain_numbers(tmp_path):
    import numpy as np

    f = tmp_path / "c.yaml"
    f.write_text("weight: [0, 1e-2, 1e-3, 300, log]\n")
    spec = load_config(Outer, files=[f]).weight
    assert spec == [0, 1e-2, 1e-3, 300, "log"]
    assert [type(v) for v in spec] == [int, float, float, int, str]
    spec = build(Outer, {"weight": [np.int64(0), np.float32(0.5), np.int64(2), 10.0]}).weight
    assert spec == [0, 0.5, 2, 10] and [type(v) for v in spec] == [int, float, int, int]
    assert type(build(Outer, {"weight": np.float64(2)}).weight) is float
    with pytest.raises(ConfigError, match="schedule entries must be numbers"):
        build(Outer, {"weight": [0, "1e-2", "1e-3", 300, "log"]})
    with pytest.raises(ConfigError, match="weight: expected a number"):
        build(Outer, {"weight": "1e-3"})


def test_build_schedules_builds_every_schedule_once_by_dotted_path():
    cfg = load_job_config("tiny")
    got = build_schedules(cfg.recon)
    assert {"lr", "levels", "weights.sds", "weights.entropy", "sds.t_min"} <= set(got)
    assert all(isinstance(s, Schedule) for s in got.values())
    assert got["lr"] == Schedule.parse(cfg.recon.lr) and got["lr"].mode == "log"
    assert got["weights.entropy"](10**6) == cfg.recon.weights.entropy
    assert "recon.weights.sds" in build_schedules(cfg)  # nested configs, full paths
