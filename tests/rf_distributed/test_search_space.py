"""Sweep files: shipped YAMLs load, every mistake is a one-line error naming its key, Tune domains
sample inside their ranges, and sampled configs come back as exactly those config values."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml

from rf_core.jobs.job_config import load_job_config
from rf_distributed.search_space import (
    SearchSpaceError,
    to_tune_mutations,
    to_tune_space,
    trial_overrides,
    tune_key,
    validate_space,
)
from rf_distributed.sweep_spec import SweepSpec, load_sweep, make_scheduler

ROOT = Path(__file__).resolve().parents[2]
DUCK = str(ROOT / "examples" / "duck.png")
SCHEDULE_OVERRIDES = ["recon.weights.normal_smooth=[0, 0.1, 1.0, 300]",
                      "recon.sds.t_max=[0, 0.98, 0.5, 300]"]


def variants(param_space: dict, seed: int = 0) -> list[dict]:
    from ray.tune.search.variant_generator import generate_variants

    return [cfg for _, cfg in generate_variants(param_space,
                                                random_state=np.random.RandomState(seed))]


def write_sweep(tmp_path: Path, **changes) -> Path:
    """A valid sweep file with ``changes`` applied (value None removes the key)."""
    data = {"name": "t", "image": DUCK, "preset": "tiny", "overrides": list(SCHEDULE_OVERRIDES),
            "space": {"recon.weights.entropy": {"loguniform": [1.0e-3, 1.0]}}}
    for key, value in changes.items():
        if value is None:
            data.pop(key)
        else:
            data[key] = value
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


# ---------------------------------------------------------------------------- shipped files


@pytest.mark.parametrize("name", ["smoke", "regularizers", "schedules", "recipe"])
def test_shipped_sweep_loads_and_its_trials_build(name, monkeypatch):
    monkeypatch.chdir(ROOT)  # relative image paths start from the working directory
    spec = load_sweep(ROOT / "tune_configs" / f"{name}.yaml")
    assert spec.name == name
    assert spec.objects or (Path(spec.image).is_absolute() and Path(spec.image).is_file())
    for sampled in variants(to_tune_space(spec.space))[:4]:
        cfg = spec.job_config(sampled)
        assert cfg.recon.steps == spec.base_config().recon.steps
    make_scheduler(spec)


def test_smoke_sweep_is_two_quick_trials(monkeypatch):
    monkeypatch.chdir(ROOT)
    spec = load_sweep("tune_configs/smoke.yaml")
    trials = [v for _ in range(spec.num_samples) for v in variants(to_tune_space(spec.space))]
    assert len(trials) == 2
    assert {t["recon.weights.entropy"] for t in trials} == {0.1, 1.0}
    cfg = spec.base_config()
    assert (cfg.recon.steps, cfg.inversion.steps, cfg.export.video.frames,
            cfg.export.mesh_resolution) == (100, 20, 8, 48)
    assert spec.scheduler["type"] == "fifo" and spec.report_every == 25
    assert spec.resources["cpu"] == 1 and spec.objective == {"input_psnr": 1.0}


def test_regularizers_sweep_uses_asha_in_steps(monkeypatch):
    from ray.tune.schedulers import ASHAScheduler

    monkeypatch.chdir(ROOT)
    spec = load_sweep("tune_configs/regularizers.yaml")
    assert spec.num_samples == 8
    sched = make_scheduler(spec)
    assert isinstance(sched, ASHAScheduler)
    assert spec.scheduler["max_t"] == 300  # recon.steps: ASHA counts optimisation steps


def test_schedules_sweep_uses_pbt_over_schedule_entries(monkeypatch):
    from ray.tune.schedulers import PopulationBasedTraining
    from ray.tune.search.sample import Float

    monkeypatch.chdir(ROOT)
    spec = load_sweep("tune_configs/schedules.yaml")
    sched = make_scheduler(spec)
    assert isinstance(sched, PopulationBasedTraining)
    assert spec.scheduler["perturbation_interval"] == 50
    muts = to_tune_mutations(spec.scheduler["hyperparam_mutations"])
    assert set(muts) == {"recon.weights.normal_smooth.2", "recon.lr.2"}
    assert all(isinstance(d, Float) for d in muts.values())
    sampled = {"recon.weights.normal_smooth.2": 0.7, "recon.sds.t_max.3": 150, "recon.lr.2": 5e-4}
    cfg = spec.job_config(sampled)
    assert cfg.recon.weights.normal_smooth == [0, 0.1, 0.7, 300]
    assert cfg.recon.sds.t_max == [0, 0.98, 0.5, 150]
    assert cfg.recon.lr == [0, 0.02, 5e-4, 300, "log"]


# ---------------------------------------------------------------------------- mistakes

_SPACE_ERRORS = [
    ({"recon.weights.entropyy": {"uniform": [0, 1]}}, "recon.weights.entropyy"),
    ({"recon.nope.entropy": {"uniform": [0, 1]}}, "recon.nope"),
    ({"recon.weights.entropy": {"uniform": [0.5, 0.5]}}, "recon.weights.entropy"),
    ({"recon.weights.entropy": {"uniform": [1.0, 0.1]}}, "recon.weights.entropy"),
    ({"recon.weights.entropy": {"loguniform": [0.0, 1.0]}}, "recon.weights.entropy"),
    ({"recon.weights.entropy": {"loguniform": [-1.0, 1.0]}}, "recon.weights.entropy"),
    ({"recon.weights.entropy": {"choice": ["big", 1.0]}}, "recon.weights.entropy"),
    ({"recon.steps": {"uniform": [100, 201]}}, "recon.steps"),  # 150.5 is not an integer
    ({"recon.steps": {"choice": [200, "many"]}}, "recon.steps"),
    ({"recon.steps": {"randint": [0, 10]}}, "recon.steps"),  # steps must be >= 1
    ({"recon.weights.entropy": {"normal": [0, 1]}}, "recon.weights.entropy"),
    ({"recon.weights.entropy": {"uniform": [0, 1, 2]}}, "recon.weights.entropy"),
    ({"recon.weights.entropy": {"quniform": [0, 1]}}, "recon.weights.entropy"),
    ({"recon.weights.entropy": {"quniform": [0, 1, 0]}}, "recon.weights.entropy"),
    ({"recon.weights.entropy": {"uniform": 0.5}}, "recon.weights.entropy"),
    ({"recon.weights.entropy": 0.5}, "recon.weights.entropy"),
    ({"recon.weights.entropy": {"uniform": [0, 1], "choice": [1]}}, "recon.weights.entropy"),
    ({"recon.weights.entropy": {"choice": []}}, "recon.weights.entropy"),
    ({"recon.weights.entropy": {"grid": []}}, "recon.weights.entropy"),
    ({"recon.sds.t_max[3]": {"randint": [100.5, 300]}}, "recon.sds.t_max[3]"),
    ({"recon.weights.orientation[2]": {"uniform": [0, 1]}}, "recon.weights.orientation"),
    ({"recon.weights.normal_smooth[4]": {"uniform": [0, 1]}}, "recon.weights.normal_smooth[4]"),
    ({"recon.lr[5]": {"uniform": [0, 1]}}, "recon.lr[5]"),
    ({"recon.lr[4]": {"choice": ["cubic"]}}, "recon.lr[4]"),
    ({"recon.nope[2]": {"uniform": [0, 1]}}, "recon.nope"),
    ({"recon..weights": {"uniform": [0, 1]}}, "recon..weights"),
    ({"recon.weights.normal_smooth": {"uniform": [0, 1]},
      "recon.weights.normal_smooth[2]": {"uniform": [0, 1]}}, "recon.weights.normal_smooth"),
    ({"recon.lr[2]": {"uniform": [1e-4, 1e-3]}, "recon.lr.2": {"uniform": [1e-4, 1e-3]}},
     "recon.lr"),
    # each entry alone is fine; together the highest values put end_step before start_step
    ({"recon.sds.t_max[0]": {"randint": [0, 200]}, "recon.sds.t_max[3]": {"randint": [0, 100]}},
     "end_step"),
]


@pytest.mark.parametrize("space,needle", _SPACE_ERRORS, ids=[n for _, n in _SPACE_ERRORS])
def test_space_mistake_is_a_one_line_error_naming_the_path(tmp_path, space, needle):
    with pytest.raises(SearchSpaceError) as info:
        load_sweep(write_sweep(tmp_path, space=space))
    msg = str(info.value)
    assert needle in msg and "\n" not in msg, msg


def test_index_on_a_number_says_to_set_the_schedule_in_overrides(tmp_path):
    path = write_sweep(tmp_path, space={"recon.weights.orientation[2]": {"uniform": [0, 1]}})
    with pytest.raises(SearchSpaceError, match=r"set it in overrides first, e\.g\. "
                                                r"recon\.weights\.orientation=\[0, 0\.01"):
        load_sweep(path)


_GT = {"gt": "GT"}  # replaced by a real ground-truth folder in the test
_SPEC_ERRORS = [
    ({"trials": 3}, "trials"),
    ({"image": "no/such/photo.png"}, "image"),
    ({"mask": "no/such/mask.png"}, "mask"),
    ({"gt": "no/such/gt"}, "gt"),
    ({**_GT, "input_view": 5}, "input_view"),
    ({"input_view": -1}, "input_view"),
    ({"preset": "huge"}, "preset"),
    ({"name": "bad name/with slash"}, "name"),
    ({"name": None}, "name"),
    ({"space": None}, "space"),
    ({"space": {}}, "space"),
    ({"overrides": ["recon.steps=many"]}, "recon.steps"),
    ({"overrides": ["recon.nope=1"]}, "overrides"),
    ({"metric": "psnr"}, "metric"),
    ({"metric": "heldout_psnr"}, "heldout_psnr"),
    ({"mode": "maximize"}, "mode"),
    ({"objective": {"psnr": 1.0}}, "psnr"),
    ({"objective": {"heldout_psnr": 1.0}}, "heldout_psnr"),
    ({"objective": {"heldout_ssim": 1.0}}, "heldout_ssim"),
    ({"objective": {"chamfer_l1": -1.0}}, "chamfer_l1"),
    ({"objective": {"fscore": 1.0}}, "fscore"),
    ({"objective": {"input_psnr": "one"}}, "input_psnr"),
    ({"objective": {}}, "objective"),
    ({"num_samples": 0}, "num_samples"),
    ({"num_samples": "two"}, "num_samples"),
    ({"max_concurrent": 0}, "max_concurrent"),
    ({"report_every": 0}, "report_every"),
    ({"resources": {"cpus": 1}}, "cpus"),
    ({"resources": {"cpu": 0}}, "resources.cpu"),
    ({"resources": {"gpu": 1.5}}, "resources.gpu"),
    ({"scheduler": {"type": "hyperband"}}, "scheduler"),
    ({"scheduler": {"grace_period": 10}}, "scheduler"),
    ({"scheduler": {"type": "fifo", "grace_period": 10}}, "grace_period"),
    ({"scheduler": {"type": "asha", "grace_period": 0}}, "grace_period"),
    ({"scheduler": {"type": "asha", "reduction_factor": 1}}, "reduction_factor"),
    ({"scheduler": {"type": "asha", "grace_period": 400}}, "grace_period"),
    ({"scheduler": {"type": "pbt"}}, "perturbation_interval"),
    ({"scheduler": {"type": "pbt", "perturbation_interval": 50, "quantile_fraction": 0.9}},
     "quantile_fraction"),
    ({"scheduler": {"type": "pbt", "perturbation_interval": 50,
                    "hyperparam_mutations": {"recon.weights.entropy": {"grid": [0.1, 1.0]}}}},
     "recon.weights.entropy"),
    ({"scheduler": {"type": "pbt", "perturbation_interval": 50,
                    "hyperparam_mutations": {"recon.weights.entropyy": {"uniform": [0, 1]}}}},
     "recon.weights.entropyy"),
]


@pytest.mark.parametrize("changes,needle", _SPEC_ERRORS, ids=[n for _, n in _SPEC_ERRORS])
def test_spec_mistake_is_a_one_line_error_naming_the_key(tmp_path, changes, needle):
    if changes.get("gt") == "GT":
        changes = {**changes, "gt": str(fake_gt(tmp_path))}
    with pytest.raises(SearchSpaceError) as info:
        load_sweep(write_sweep(tmp_path, **changes))
    msg = str(info.value)
    assert needle in msg and "\n" not in msg, msg


def test_bad_yaml_and_missing_file_are_search_space_errors(tmp_path):
    with pytest.raises(SearchSpaceError, match="does not exist"):
        load_sweep(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(SearchSpaceError, match="not valid YAML"):
        load_sweep(bad)
    assert issubclass(SearchSpaceError, ValueError)


def fake_gt(tmp_path: Path, views: int = 3) -> Path:
    gt = tmp_path / "gt"
    gt.mkdir(exist_ok=True)
    from rf_core.scene.cameras import sphere_views

    # cameras only: the sweep reads every object's input camera at start, never the images
    (gt / "cameras.json").write_text(json.dumps(sphere_views(views, 3.0, 40.0, 32, 32).to_json()))
    return gt


def test_relative_paths_resolve_from_the_working_directory(tmp_path, monkeypatch):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "duck.png").write_bytes(Path(DUCK).read_bytes())
    path = write_sweep(tmp_path, image="photos/duck.png")
    monkeypatch.chdir(tmp_path)
    assert load_sweep(path).image == str(tmp_path / "photos" / "duck.png")
    monkeypatch.chdir(ROOT)
    with pytest.raises(SearchSpaceError, match="relative paths start from the current directory"):
        load_sweep(path)


def test_gt_enables_held_out_objectives_and_defaults_to_them(tmp_path):
    gt = fake_gt(tmp_path)
    spec = load_sweep(write_sweep(tmp_path, gt=str(gt), input_view=2))
    assert spec.objective == {"heldout_psnr": 1.0} and spec.gt == str(gt)
    spec = load_sweep(write_sweep(tmp_path, gt=str(gt), metric="chamfer_l1", mode="min",
                                  objective={"heldout_psnr": 0.5, "chamfer_l1": -10.0}))
    assert spec.objective == {"heldout_psnr": 0.5, "chamfer_l1": -10.0}
    assert load_sweep(write_sweep(tmp_path)).objective == {"input_psnr": 1.0}


def test_validate_space_directly():
    validate_space({"recon.lr[1]": {"loguniform": [1e-3, 3e-2]}}, "tiny", [])
    with pytest.raises(SearchSpaceError, match="preset"):
        validate_space({"recon.lr[1]": {"uniform": [0.1, 0.2]}}, "huge", [])
    with pytest.raises(SearchSpaceError, match="overrides"):
        validate_space({"recon.lr[1]": {"uniform": [0.1, 0.2]}}, "tiny", ["recon.steps=0"])


# ---------------------------------------------------------------------------- Tune domains


def test_tune_keys_are_safe_for_tune_and_mlflow():
    assert tune_key("recon.lr[1]") == "recon.lr.1"
    assert tune_key("recon.weights.entropy") == "recon.weights.entropy"
    space = {"recon.weights.normal_smooth[2]": {"uniform": [0.1, 1.0]},
             "recon.weights.entropy": {"uniform": [0, 1]}}
    assert all(set(k) <= set("abcdefghijklmnopqrstuvwxyz_.0123456789") for k in
               to_tune_space(space))


def test_to_tune_space_domains_and_ranges():
    from ray.tune.search.sample import Categorical, Float, Integer

    space = {
        "recon.weights.entropy": {"loguniform": [1.0e-3, 1.0]},
        "recon.weights.orientation": {"uniform": [0.0, 0.1]},
        "recon.sds.guidance_scale": {"choice": [50, 100]},
        "recon.weights.opacity": {"quniform": [0.0, 1.0, 0.25]},
        "recon.sds.t_max[3]": {"randint": [100, 103]},
        "recon.lr[1]": {"loguniform": [1e-3, 3e-2]},
    }
    domains = to_tune_space(space)
    assert set(domains) == {tune_key(k) for k in space}
    ent = domains["recon.weights.entropy"]
    assert isinstance(ent, Float) and (ent.lower, ent.upper) == (1e-3, 1.0)
    assert type(ent.get_sampler()).__name__ == "_LogUniform"
    assert isinstance(domains["recon.sds.guidance_scale"], Categorical)
    assert isinstance(domains["recon.sds.t_max.3"], Integer)

    rng = np.random.RandomState(0)
    draw = {k: np.asarray(d.sample(size=2000, random_state=rng)) for k, d in domains.items()}
    e = draw["recon.weights.entropy"]
    assert e.min() >= 1e-3 and e.max() <= 1.0
    assert 0.4 < np.mean(np.log10(e) < -1.5) < 0.6  # log-uniform: half below 10^-1.5
    o = draw["recon.weights.orientation"]
    assert o.min() >= 0.0 and o.max() <= 0.1 and 0.04 < o.mean() < 0.06
    assert set(draw["recon.sds.guidance_scale"].tolist()) == {50, 100}
    assert set(draw["recon.weights.opacity"].tolist()) <= {0.0, 0.25, 0.5, 0.75, 1.0}
    assert set(draw["recon.sds.t_max.3"].tolist()) == {100, 101, 102}  # high excluded
    lr = draw["recon.lr.1"]
    assert lr.min() >= 1e-3 and lr.max() <= 3e-2


def test_grid_expands_to_one_variant_per_value():
    space = {"recon.weights.normal_smooth": {"grid": [0.1, 0.5, 1.0]},
             "recon.weights.entropy": {"uniform": [0.0, 1.0]}}
    got = variants(to_tune_space(space))
    assert [v["recon.weights.normal_smooth"] for v in got] == [0.1, 0.5, 1.0]
    assert all(0.0 <= v["recon.weights.entropy"] <= 1.0 for v in got)


def test_pbt_mutations_keep_choices_as_lists():
    muts = to_tune_mutations({"recon.weights.opacity": {"choice": [0.0, 0.01]},
                              "recon.lr[2]": {"loguniform": [1e-4, 1e-2]}})
    assert muts["recon.weights.opacity"] == [0.0, 0.01]
    assert muts["recon.lr.2"].lower == 1e-4


def test_asha_max_t_follows_swept_steps(tmp_path):
    spec = load_sweep(write_sweep(tmp_path, scheduler={"type": "asha"},
                                  space={"recon.steps": {"choice": [200, 400]}}))
    assert spec.max_steps() == 400 and spec.scheduler["max_t"] == 400
    assert spec.scheduler["grace_period"] == spec.report_every


# ---------------------------------------------------------------------------- trial overrides


def test_trial_overrides_set_exactly_the_sampled_values():
    sampled = {"recon.weights.entropy": np.float64(0.0312345678901234),
               "recon.steps": np.int64(250), "recon.sds.weighting": "uniform",
               "recon.sds.grad_clip": None, "recon.sds.guidance_scale": 7.5e-05}
    overrides = trial_overrides(sampled)
    assert overrides[:2] == ["recon.weights.entropy=0.0312345678901234", "recon.steps=250"]
    cfg = load_job_config("tiny", [], overrides)
    assert cfg.recon.weights.entropy == 0.0312345678901234
    assert cfg.recon.steps == 250 and isinstance(cfg.recon.steps, int)
    assert cfg.recon.sds.weighting == "uniform" and cfg.recon.sds.grad_clip is None
    assert cfg.recon.sds.guidance_scale == 7.5e-05


def test_schedule_entries_merge_into_one_full_list():
    base = load_job_config("tiny", [], SCHEDULE_OVERRIDES)
    sampled = {"recon.weights.normal_smooth.2": 0.7, "recon.lr[2]": 5e-4,
               "recon.weights.normal_smooth[3]": np.int64(250), "recon.weights.entropy": 0.2}
    overrides = trial_overrides(sampled, base)
    assert overrides == ["recon.weights.normal_smooth=[0, 0.1, 0.7, 250]",
                         'recon.lr=[0, 0.02, 0.0005, 300, "log"]', "recon.weights.entropy=0.2"]
    cfg = load_job_config("tiny", [], SCHEDULE_OVERRIDES + overrides)
    assert cfg.recon.weights.normal_smooth == [0, 0.1, 0.7, 250]
    assert cfg.recon.lr == [0, 0.02, 5e-4, 300, "log"] and cfg.recon.weights.entropy == 0.2
    assert base.recon.weights.normal_smooth == [0, 0.1, 1.0, 300]  # base untouched


def test_trial_overrides_need_a_base_for_schedule_entries():
    with pytest.raises(SearchSpaceError, match="recon.lr"):
        trial_overrides({"recon.lr.2": 1e-3})
    with pytest.raises(SearchSpaceError, match="recon.lr"):
        trial_overrides({"recon.lr": [0, 1e-2, 1e-3, 10], "recon.lr.2": 1e-3},
                        load_job_config("tiny"))


def test_sampled_variants_round_trip_into_configs(tmp_path):
    spec = load_sweep(write_sweep(tmp_path, num_samples=4, space={
        "recon.weights.normal_smooth[2]": {"uniform": [0.1, 2.0]},
        "recon.sds.t_max[3]": {"randint": [100, 301]},
        "recon.lr[2]": {"loguniform": [1e-4, 1e-2]},
        "recon.weights.opacity": {"choice": [0.0, 1e-3]},
        "recon.sds.guidance_scale": {"quniform": [10, 100, 5]},
    }))
    for seed in range(4):
        (sampled,) = variants(to_tune_space(spec.space), seed)
        cfg = spec.job_config(sampled)
        assert cfg.recon.weights.normal_smooth == [0, 0.1, sampled["recon.weights.normal_smooth.2"],
                                                   300]
        assert cfg.recon.sds.t_max == [0, 0.98, 0.5, int(sampled["recon.sds.t_max.3"])]
        assert cfg.recon.lr[2] == sampled["recon.lr.2"]
        assert cfg.recon.weights.opacity == sampled["recon.weights.opacity"]
        assert cfg.recon.sds.guidance_scale == sampled["recon.sds.guidance_scale"]
        assert math.isclose(cfg.recon.sds.guidance_scale / 5, round(cfg.recon.sds.guidance_scale
                                                                    / 5))


def test_spec_built_in_code_validates_too():
    with pytest.raises(SearchSpaceError, match="recon.weights.entropyy"):
        SweepSpec(name="t", image=DUCK, space={"recon.weights.entropyy": {"uniform": [0, 1]}})
    spec = SweepSpec(name="t", image=DUCK, space={"recon.weights.entropy": {"uniform": [0, 1]}})
    assert spec.scheduler == {"type": "fifo"} and spec.resources == {"cpu": 1, "gpu": 0.0}


# ---------------------------------------------------------------------------- sampled draws


@pytest.mark.parametrize("dist", [{"uniform": [10, 20]}, {"loguniform": [10, 20]},
                                  {"quniform": [10, 20, 0.5]}])
def test_integer_field_under_a_float_distribution_fails_at_start(tmp_path, dist):
    """Every end of uniform [10, 20] is whole; its draws (13.59, ...) are not."""
    with pytest.raises(SearchSpaceError) as info:
        load_sweep(write_sweep(tmp_path, space={"recon.steps": dist}))
    msg = str(info.value)
    assert f"space 'recon.steps': {next(iter(dist))} draws non-integers (e.g. " in msg, msg
    assert "recon.steps expects an integer; use randint" in msg and "\n" not in msg, msg


def test_integer_field_under_whole_number_distributions_is_fine(tmp_path):
    for dist in ({"randint": [10, 21]}, {"quniform": [10, 20, 2]}, {"choice": [10, 20]}):
        spec = load_sweep(write_sweep(tmp_path, space={"recon.steps": dist}))
        assert spec.max_steps() == 20


@pytest.mark.parametrize("space, needle", [
    ({"recon.renderer.occupancy.alpha_threshold": {"uniform": [0.0, 1.5]}},
     "alpha_threshold: must be in [0, 1), got 1.5"),
    ({"recon.renderer.occupancy.decay": {"quniform": [0.0, 1.0, 0.25]}}, "decay"),
    ({"export.mesh_resolution": {"randint": [4, 64]}}, "must be >= 8, got 4"),
    ({"recon.lr[2]": {"uniform": [0.0, 1e-2]}}, "recon.lr[2]: must be > 0"),
    # each alone is fine, and so are both lowest and both highest; random draws cross
    ({"recon.sds.t_min": {"uniform": [0.0, 0.9]}, "recon.sds.t_max": {"uniform": [0.1, 1.0]}},
     "values drawn together"),
])
def test_out_of_range_draws_fail_at_start(tmp_path, space, needle):
    overrides = [] if "recon.lr[2]" not in space else ["recon.lr=[0, 0.02, 0.002, 300]"]
    with pytest.raises(SearchSpaceError) as info:
        load_sweep(write_sweep(tmp_path, space=space, overrides=overrides))
    msg = str(info.value)
    assert needle in msg and "\n" not in msg, msg


@pytest.mark.parametrize("path", sorted((ROOT / "tune_configs").glob("*.yaml")),
                         ids=lambda p: p.stem)
def test_every_shipped_sweep_validates(path, monkeypatch):
    monkeypatch.chdir(ROOT)
    spec = load_sweep(path)
    validate_space(spec.space, spec.preset, spec.overrides)


def test_gpus_per_trial_is_checked_like_the_files_own_resources(monkeypatch):
    """``rf sweep --gpus-per-trial`` replaces resources.gpu before validation."""
    monkeypatch.chdir(ROOT)
    spec = load_sweep(ROOT / "tune_configs" / "smoke.yaml", gpus_per_trial=0.25)
    assert spec.resources["gpu"] == 0.25 and spec.resources["cpu"] >= 1
    with pytest.raises(SearchSpaceError, match=r"resources.gpu 1.5"):
        load_sweep(ROOT / "tune_configs" / "smoke.yaml", gpus_per_trial=1.5)
