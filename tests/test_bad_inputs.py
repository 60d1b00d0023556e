"""Bad input, generated: every mistake a user can make ends in exit 2, at most three lines on
stderr closing with one ``rf: error:`` line that names the key or file, no traceback, and
nothing left behind (no ``--out``, an existing one byte-for-byte unchanged).

Config values are drawn by hypothesis from the dataclass schemas: every field of
``ReconstructJobConfig`` (``rf reconstruct``) and ``InvertJobConfig`` (``rf invert``) gets a
wrong-type case, a non-finite case where it holds floats and an out-of-range case where it
declares a range. Files (photos, masks, embeddings, meshes, manifests, sweep files) are emptied,
truncated, resized or replaced by garbage. Every case runs ``rf_cli.main.main`` in-process and
must fail before any training starts.
"""

from __future__ import annotations

import builtins
import contextlib
import dataclasses
import hashlib
import io
import json
import math
import shutil
import string
import types
import typing
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pybullet_data
import pytest
import torch
import yaml
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageDraw
from safetensors.torch import save_file

from rf_cli.main import main
from rf_core.config import Schedule, field_range, parse_override, preset_names, to_dict
from rf_core.input.dataset_listing import MANIFEST_COLUMNS, object_name, read_dataset
from rf_core.jobs.invert_job import InvertJobConfig
from rf_core.jobs.job_config import ReconstructJobConfig, load_job_config
from rf_distributed.sweep_spec import SweepSpec, load_sweep

ROOT = Path(__file__).resolve().parents[1]

# A run that, should a bad value slip through, still finishes in a second or two (and fails the
# exit-code check) instead of training for minutes.
TINY = ["recon.steps=2", "recon.input_size=16", "recon.input_rays=64", "recon.sds_size=16",
        "recon.albedo_steps=1", "recon.renderer.num_samples=8",
        "recon.renderer.occupancy.resolution=8", "recon.renderer.occupancy.warmup_steps=1",
        "recon.field.grid.n_levels=2", "recon.field.grid.log2_hashmap_size=8",
        "recon.levels=[0,1,2,2]", "inversion.steps=1", "input.size=32",
        "export.video.frames=1", "export.video.size=8", "export.mesh_resolution=8",
        "export.threshold=1.0", "device=cpu"]


def cases(n: int):
    """Hypothesis settings: ``n`` examples, deterministic, no example database."""
    return settings(max_examples=n, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                           HealthCheck.data_too_large])


# ---------------------------------------------------------------------------- the contract


def tree(root: Path) -> dict[str, str]:
    """Every path under ``root`` (hidden ones too) -> "dir" or the hash of its bytes."""
    return {str(p.relative_to(root)): "dir" if p.is_dir() and not p.is_symlink()
            else hashlib.sha1(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))}


def key_named(key: str):
    """The error line names dotted ``key``: in full, or as its section plus its field name
    (``recon.field: bound must be positive``, from a config's own validation)."""
    parent, _, leaf = key.rpartition(".")
    return lambda line: key in line or (leaf in line and parent in line)


def rf(ws, argv, *names) -> str:
    """Run ``rf ARGV`` in-process and check the bad-input contract; returns the error line.

    ``names``: strings (or predicates on the error line), at least one of which the error
    line must contain. The whole workspace must be unchanged afterwards.
    """
    argv = [str(a) for a in argv]
    before = tree(ws.root)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), \
            warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")  # what `rf` shows: Python's filters outside __main__
        for quiet in (DeprecationWarning, PendingDeprecationWarning, ImportWarning,
                      ResourceWarning):
            warnings.simplefilter("ignore", quiet)
        try:
            code = main(argv)
        except SystemExit as e:  # argparse
            code = e.code
    shown_warnings = "".join(warnings.formatwarning(w.message, w.category, w.filename, w.lineno,
                                                    w.line) for w in caught)
    text = out.getvalue() + err.getvalue() + shown_warnings
    lines = (shown_warnings + err.getvalue()).strip().splitlines()
    shown = f"rf {' '.join(argv)}\n{text[-3000:]}"
    assert code == 2, f"exit {code}, not 2:\n{shown}"
    assert "Traceback" not in text, shown
    assert 1 <= len(lines) <= 3 and lines[-1].startswith("rf: error: "), shown
    line = lines[-1]
    assert any(n(line) if callable(n) else str(n) in line for n in names), \
        f"none of {names} named in:\n{line}"
    after = tree(ws.root)
    changed = sorted(set(after.items()) ^ set(before.items()))
    assert not changed, f"left behind or changed: {changed[:6]}\n{shown}"
    return line


@contextlib.contextmanager
def scratch(ws):
    """A fresh folder for one example's bad files, removed afterwards."""
    folder = ws.root / "case"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """Inputs every case starts from: a noisy photo (so a truncated PNG misses pixel data),
    its mask, a manifest of that object, and where the outputs would go."""
    root = tmp_path_factory.mktemp("bad-inputs")
    inputs = root / "inputs"
    inputs.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(inputs / "photo.png")
    mask = Image.new("L", (64, 64), 0)
    ImageDraw.Draw(mask).ellipse((16, 16, 48, 48), fill=255)
    mask.save(inputs / "mask.png")
    (inputs / "objects.jsonl").write_text(json.dumps({"image": "photo.png", "mask": "mask.png"})
                                          + "\n")
    duck = inputs / "duck"
    duck.mkdir()
    for name in ("duck.obj", "duck.mtl", "duckCM.png"):
        shutil.copy(Path(pybullet_data.getDataPath()) / name, duck / name)
    track = tmp_path_factory.mktemp("tracking")  # outside root: MLflow is not an --out
    return SimpleNamespace(root=root, inputs=inputs, duck=duck / "duck.obj",
                           photo=inputs / "photo.png",
                           mask=inputs / "mask.png", manifest=inputs / "objects.jsonl",
                           out=root / "run", emb=root / "e.safetensors",
                           track=f"sqlite:///{track}/mlflow.db")


def reconstruct_argv(ws, *extra):
    return ["reconstruct", ws.photo, "--mask", ws.mask, "--invert", "--preset", "tiny", "--out",
            ws.out, *TINY, *extra]


def invert_argv(ws, *extra):
    return ["invert", ws.photo, "--mask", ws.mask, "--model", "tiny", "--out", ws.emb,
            "inversion.steps=1", "input.size=32", *extra]


def dataset_argv(ws, source, *extra):
    return ["dataset", source, "--out", ws.root / "results", "--preset", "tiny",
            "--tracking-uri", ws.track, *TINY, *extra]


COMMANDS = {"reconstruct": reconstruct_argv, "invert": invert_argv}


# ---------------------------------------------------------------------------- config schema


@dataclasses.dataclass(frozen=True)
class Leaf:
    """One config field as the command line addresses it."""

    command: str
    key: str
    kind: str
    """int, float, bool, str, named (a precision or device name), schedule, optional_str,
    optional_float, list_float, list_str."""
    field: dataclasses.Field
    default: typing.Any

    def __repr__(self) -> str:
        return f"{self.command}:{self.key}"


def _kind(f: dataclasses.Field, tp) -> str:
    if f.metadata.get("schedule"):
        return "schedule"
    if f.metadata.get("parse"):
        return "named"
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        (inner,) = [a for a in typing.get_args(tp) if a is not type(None)]
        return f"optional_{inner.__name__}"
    if origin in (list, tuple):
        return f"list_{typing.get_args(tp)[0].__name__}"
    return tp.__name__


def _leaves(command: str, cls, defaults: dict, prefix: str = ""):
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp, key = hints[f.name], f"{prefix}{f.name}"
        if dataclasses.is_dataclass(tp):
            yield from _leaves(command, tp, defaults[f.name], f"{key}.")
        else:
            yield Leaf(command, key, _kind(f, tp), f, defaults[f.name])


LEAVES = (list(_leaves("reconstruct", ReconstructJobConfig, to_dict(ReconstructJobConfig())))
          + list(_leaves("invert", InvertJobConfig, to_dict(InvertJobConfig()))))
RANGED = [leaf for leaf in LEAVES if field_range(leaf.field) is not None]
FLOATS = [leaf for leaf in LEAVES
          if leaf.kind in ("float", "optional_float", "list_float", "schedule")]
RECONSTRUCT = [leaf for leaf in LEAVES if leaf.command == "reconstruct"]


def field_names(cls, parts: list[str]) -> set[str]:
    """Field names of the dataclass reached from ``cls`` through ``parts``."""
    for part in parts:
        cls = typing.get_type_hints(cls)[part]
    return {f.name for f in dataclasses.fields(cls)}


def yaml_text(value) -> str:
    """``value`` as an override writes it; checked to read back as exactly ``value``."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10**6, sort_keys=False)
    text = text.removesuffix("\n...\n").strip()
    (got,) = parse_override(f"k={text}").values()
    assert repr(got) == repr(value), (value, text, got)
    return text


def override(key: str, value) -> str:
    return f"{key}={yaml_text(value)}"


WORDS = st.text(string.ascii_letters, min_size=1, max_size=8)
INTS = st.integers(-10**6, 10**6)
FINITE = st.floats(-1e6, 1e6, allow_nan=False)
FRACTIONAL = FINITE.filter(lambda x: not x.is_integer())
NONFINITE = st.sampled_from([math.inf, -math.inf, math.nan])
LISTS = st.lists(st.integers(-3, 3), max_size=3)
MAPS = st.dictionaries(WORDS, st.integers(0, 9), min_size=1, max_size=2)
WORD_LISTS = st.lists(WORDS, min_size=1, max_size=2)


@st.composite
def bad_schedules(draw):
    """Specs that are no schedule: wrong length, a word or a fractional step among the entries,
    an unknown mode."""
    spec = draw(st.lists(st.integers(0, 9).map(float), min_size=4, max_size=4))
    how = draw(st.sampled_from(["length", "word", "fraction", "mode"]))
    if how == "length":
        return draw(st.lists(FINITE, max_size=7).filter(lambda s: len(s) not in (4, 5)))
    if how == "word":
        spec[draw(st.integers(0, 3))] = draw(WORDS)
    elif how == "fraction":
        spec[draw(st.sampled_from([0, 3]))] = draw(FRACTIONAL)
    else:
        spec.append(draw(WORDS.filter(lambda w: w not in ("linear", "log"))))
    return spec


WRONG_TYPE = {
    "int": st.one_of(WORDS, LISTS, MAPS, st.booleans(), FRACTIONAL, NONFINITE, st.none()),
    "float": st.one_of(WORDS, LISTS, MAPS, st.booleans(), NONFINITE, st.none()),
    "bool": st.one_of(WORDS, INTS, FINITE, LISTS, MAPS, st.none()),
    "str": st.one_of(INTS, FINITE, st.booleans(), WORD_LISTS, MAPS, st.none()),
    "named": st.one_of(INTS, FINITE, WORD_LISTS, MAPS),  # a precision may be false or null
    "optional_str": st.one_of(INTS, FINITE, st.booleans(), WORD_LISTS, MAPS),
    "optional_float": st.one_of(WORDS, LISTS, MAPS, st.booleans(), NONFINITE),
    "list_float": st.one_of(WORDS, FINITE, MAPS, st.booleans(), WORD_LISTS, st.none(),
                            st.lists(st.booleans(), min_size=1, max_size=2)),
    "list_str": st.one_of(INTS, WORDS, MAPS, st.lists(INTS, min_size=1, max_size=2), st.none()),
    "schedule": st.one_of(WORDS, MAPS, st.booleans(), st.none(), NONFINITE, bad_schedules()),
}


def test_every_field_is_covered():
    assert len(LEAVES) > 150 and len(RANGED) > 80
    assert {leaf.kind for leaf in LEAVES} <= set(WRONG_TYPE)
    keys = {leaf.key for leaf in RECONSTRUCT}
    assert {"recon.lr", "recon.camera.random.fov_range", "inversion.augment.scale",
            "export.video.formats", "model.device", "device", "embedding"} <= keys


@pytest.mark.parametrize("leaf", LEAVES, ids=repr)
@cases(4)
@given(data=st.data())
def test_wrong_type(ws, leaf, data):
    value = data.draw(WRONG_TYPE[leaf.kind], label="value")
    event(f"{leaf.kind} <- {type(value).__name__}")
    rf(ws, COMMANDS[leaf.command](ws, override(leaf.key, value)), key_named(leaf.key))


def _inside(leaf) -> float:
    """A value inside the range of ``leaf``: its default (the first item of a list)."""
    if leaf.kind == "schedule":
        return Schedule.parse(leaf.default).start_value
    return leaf.default[0] if isinstance(leaf.default, list) else leaf.default


@st.composite
def place(draw, leaf, value):
    """Put the bad number ``value`` where ``leaf`` holds numbers: the value itself, one end
    of a [low, high] list, or one value of a schedule."""
    if leaf.kind == "list_float":
        items = list(leaf.default)
        items[draw(st.integers(0, len(items) - 1))] = value
        return items
    if leaf.kind == "schedule" and draw(st.booleans()):
        inside = _inside(leaf)
        spec = [0, inside, inside, 10]
        spec[draw(st.sampled_from([1, 2]))] = value
        return spec
    return value


@st.composite
def outside(draw, leaf):
    """A number just outside the declared range of ``leaf``, placed as ``leaf`` holds it."""
    rng = field_range(leaf.field)
    integer = leaf.kind == "int"
    ends = [(b, below, is_open) for b, below, is_open in ((rng.lo, True, rng.lo_open),
                                                          (rng.hi, False, rng.hi_open))
            if b is not None]
    bound, below, is_open = draw(st.sampled_from(ends))
    if integer:
        gap = draw(st.integers(0 if is_open else 1, 100))
    else:
        gap = draw(st.floats(1e-6, 100) | st.just(0.0) if is_open else st.floats(1e-6, 100))
        gap *= max(1.0, abs(bound))
    value = bound - gap if below else bound + gap
    value = int(value) if integer else float(value)
    assume(not rng.contains(value))
    if leaf.kind == "list_float":  # keep [low, high] ordered: the low end goes lower
        items = list(leaf.default)
        items[0 if below else -1] = value
        return items
    return draw(place(leaf, value))


@pytest.mark.parametrize("leaf", RANGED, ids=repr)
@cases(3)
@given(data=st.data())
def test_out_of_range(ws, leaf, data):
    value = data.draw(outside(leaf), label="value")
    rf(ws, COMMANDS[leaf.command](ws, override(leaf.key, value)), key_named(leaf.key))


@pytest.mark.parametrize("leaf", FLOATS, ids=repr)
@cases(3)
@given(data=st.data())
def test_non_finite(ws, leaf, data):
    number = data.draw(NONFINITE | st.sampled_from(["inf", "-inf", "nan", "Infinity", "NaN"]),
                       label="number")
    value = data.draw(place(leaf, number), label="value")
    rf(ws, COMMANDS[leaf.command](ws, override(leaf.key, value)), key_named(leaf.key))


@st.composite
def typo_of(draw, word: str):
    """``word`` with one letter dropped, added, changed or two swapped, or its case changed."""
    i = draw(st.integers(0, len(word) - 1))
    letter = draw(st.sampled_from(string.ascii_lowercase + "_"))
    how = draw(st.sampled_from(["drop", "add", "change", "swap", "case"]))
    if how == "drop" and len(word) > 1:
        return word[:i] + word[i + 1:]
    if how == "swap" and i + 1 < len(word):
        return word[:i] + word[i + 1] + word[i] + word[i + 2:]
    if how == "case":
        return word[:i] + word[i].swapcase() + word[i + 1:]
    if how == "change":
        return word[:i] + letter + word[i + 1:]
    return word[:i] + letter + word[i:]


@cases(80)
@given(leaf=st.sampled_from(LEAVES), data=st.data())
def test_unknown_key(ws, leaf, data):
    parts = leaf.key.split(".")
    depth = data.draw(st.integers(0, len(parts) - 1), label="depth")
    typo = data.draw(typo_of(parts[depth]), label="typo")
    cls = ReconstructJobConfig if leaf.command == "reconstruct" else InvertJobConfig
    assume(typo not in field_names(cls, parts[:depth]))
    wrong = ".".join([*parts[:depth], typo])
    key = ".".join([wrong, *parts[depth + 1:]])
    line = rf(ws, COMMANDS[leaf.command](ws, f"{key}=1"), f"unknown config key '{wrong}'")
    assert "valid keys" in line


# Text fields: each either names one of a fixed set, is checked some other way, or is free.
NAMED = {"model.type", "model.dtype", "model.device", "model.attention", "input.remove_background",
         "inversion.mixed_precision", "inversion.augment.background", "recon.mixed_precision",
         "recon.field.grid.backend", "recon.field.normal_difference", "recon.sds.weighting",
         "recon.background", "recon.prompt.regime", "joint.model.type", "joint.model.dtype",
         "joint.model.device", "joint.model.attention", "joint.sds.weighting", "device"}
NAMED_LISTS = {"export.video.formats", "export.video.panels"}
CHECKED_TEXT = {"recon.prompt.template", "inversion.token", "model.name"}
FREE_TEXT = {"model.single_file_config", "joint.model.single_file_config", "joint.model.name",
             "embedding", "inversion.initializer",
             "recon.prompt.token", "recon.prompt.negative"}
"""Free text: a path checked when used, a word the tokenizer checks after the model loads
(tests/rf_cli/test_cli.py), or replaced by the learned token."""


def test_every_text_field_is_classified():
    text = {leaf.key for leaf in LEAVES if leaf.kind in ("str", "named", "optional_str",
                                                           "list_str")}
    groups = [NAMED, NAMED_LISTS, CHECKED_TEXT, FREE_TEXT]
    assert text == set().union(*groups) and sum(map(len, groups)) == len(text)


BAD_NAMES = WORDS.map(lambda w: f"zz{w}")  # no valid name, precision or device starts so


@pytest.mark.parametrize("leaf", [leaf for leaf in LEAVES if leaf.key in NAMED | NAMED_LISTS],
                         ids=repr)
@cases(3)
@given(data=st.data())
def test_unknown_name(ws, leaf, data):
    name = data.draw(BAD_NAMES, label="name")
    value = [*leaf.default[:1], name] if leaf.key in NAMED_LISTS else name
    rf(ws, COMMANDS[leaf.command](ws, override(leaf.key, value)), key_named(leaf.key))


BAD_TEXT = {
    "recon.prompt.template": WORDS,  # no {token} in it
    "inversion.token": st.just("") | WORDS.map(lambda w: f"{w}\t")
    | st.builds(" ".join, WORD_LISTS.filter(lambda w: len(w) > 1)),
    "model.name": BAD_NAMES,  # neither a path, a cached hub id nor a random-weight model
}


@pytest.mark.parametrize("leaf", [leaf for leaf in LEAVES if leaf.key in CHECKED_TEXT], ids=repr)
@cases(3)
@given(data=st.data())
def test_checked_text(ws, leaf, data):
    value = data.draw(BAD_TEXT[leaf.key], label="value")
    named = value if leaf.key == "model.name" else key_named(leaf.key)
    rf(ws, COMMANDS[leaf.command](ws, override(leaf.key, value)), named)


@cases(25)
@given(leaf=st.sampled_from(RECONSTRUCT), data=st.data())
def test_dataset_config(ws, leaf, data):
    """``rf dataset`` builds the same config before Ray, MLflow or any output."""
    value = data.draw(WRONG_TYPE[leaf.kind], label="value")
    rf(ws, dataset_argv(ws, ws.manifest, override(leaf.key, value)), key_named(leaf.key))


# ---------------------------------------------------------------------------- images and masks


IMAGE_KINDS = ["empty", "truncated", "garbage", "png-garbage", "text"]


@st.composite
def broken_image(draw, good: bytes, kind: str):
    """(bytes, suffix) of a file that is no image: empty, cut short, garbage, text."""
    data = {
        "empty": lambda: b"",
        "truncated": lambda: good[:draw(st.integers(0, int(len(good) * 0.9)))],
        "garbage": lambda: draw(st.binary(min_size=1, max_size=2000)),
        "png-garbage": lambda: good[:8] + draw(st.binary(max_size=500)),
        "text": lambda: draw(st.text(max_size=200)).encode(),
    }[kind]()
    return data, draw(st.sampled_from([".png", ".jpg", ".webp", ".txt", ""]))


@pytest.mark.parametrize("kind", IMAGE_KINDS)
@cases(6)
@given(role=st.sampled_from(["image", "mask"]), command=st.sampled_from(["reconstruct", "invert"]),
       data=st.data())
def test_broken_image_or_mask(ws, kind, role, command, data):
    content, suffix = data.draw(broken_image(ws.photo.read_bytes(), kind), label="file")
    with scratch(ws) as case:
        path = case / f"bad{suffix}"
        path.write_bytes(content)
        argv = COMMANDS[command](ws)
        argv[argv.index(ws.photo if role == "image" else ws.mask)] = path
        rf(ws, argv, path)


@cases(10)
@given(role=st.sampled_from(["image", "mask"]), what=st.sampled_from(["folder", "missing", "tiny"]),
       side=st.integers(1, 31))
def test_unusable_image_path(ws, role, what, side):
    with scratch(ws) as case:
        path = case / "x.png"
        if what == "folder":
            path.mkdir()
        elif what == "tiny":  # smaller than input.min_size=32 on one side
            Image.new("RGB", (side, 64), "red").save(path)
        argv = reconstruct_argv(ws)
        argv[argv.index(ws.photo if role == "image" else ws.mask)] = path
        rf(ws, argv, path)


@cases(15)
@given(w=st.integers(8, 160), h=st.integers(8, 160))
def test_mask_of_another_size(ws, w, h):
    assume(abs(w - h) > 0.01 * h or min(w, h) < 32)  # the photo is 64x64
    with scratch(ws) as case:
        mask = Image.new("L", (w, h), 0)
        ImageDraw.Draw(mask).ellipse((w // 4, h // 4, 3 * w // 4, 3 * h // 4), fill=255)
        mask.save(case / "mask.png")
        argv = reconstruct_argv(ws)
        argv[argv.index(ws.mask)] = case / "mask.png"
        rf(ws, argv, case / "mask.png")


@cases(10)
@given(level=st.integers(0, 255), side=st.sampled_from([32, 64, 128]),
       command=st.sampled_from(["reconstruct", "invert"]))
def test_empty_or_full_mask(ws, level, side, command):
    """All black (nothing above mask_threshold=0.5) or all white (no background)."""
    with scratch(ws) as case:
        Image.new("L", (side, side), level).save(case / "mask.png")
        argv = COMMANDS[command](ws)
        argv[argv.index(ws.mask)] = case / "mask.png"
        line = rf(ws, argv, case / "mask.png")
        assert ("empty" if level <= 127 else "whole image") in line


# ---------------------------------------------------------------------------- embeddings


class _Opens:
    """Unpickling this would create a file: torch.load(weights_only=True) must refuse."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return builtins.open, (self.path, "w")


EMBEDDING_KINDS = ["size", "nonfinite", "two", "matrix", "pickle", "evil", "garbage", "empty",
                   "dtype", "token", "a1111", "container"]


@st.composite
def broken_embedding(draw, folder: Path, kind: str):
    """Write one unusable textual-inversion file into ``folder``; returns its path."""
    suffix = draw(st.sampled_from([".bin", ".pt"]))
    path = folder / f"emb-{kind}.safetensors"

    def tensors(state: dict) -> Path:
        if draw(st.booleans()):
            save_file(state, str(path))
            return path
        torch.save(state, path.with_suffix(suffix))
        return path.with_suffix(suffix)

    if kind == "size":  # the tiny model's text encoder is 32 wide
        return tensors({"<e>": torch.randn(draw(st.integers(1, 80).filter(lambda d: d != 32)))})
    if kind == "nonfinite":
        vector = torch.randn(32)
        for i in draw(st.lists(st.integers(0, 31), min_size=1, max_size=4)):
            vector[i] = draw(NONFINITE)
        return tensors({"<e>": vector})
    if kind == "two":
        n = draw(st.integers(2, 4))
        return tensors({f"<t{i}>": torch.randn(32) for i in range(n)})
    if kind == "matrix":
        shape = draw(st.sampled_from([(2, 32), (4, 32), (1, 2, 32), ()]))
        return tensors({"<e>": torch.randn(shape)})
    if kind == "dtype":
        dtype = draw(st.sampled_from([torch.int64, torch.int32, torch.bool, torch.uint8]))
        return tensors({"<e>": torch.ones(32, dtype=dtype)})
    if kind == "token":
        token = draw(st.sampled_from(["", " ", "<e> x", "a\tb"]))
        return tensors({token: torch.randn(32)})
    target = path.with_suffix(suffix)
    if kind == "pickle":  # plain Python objects, no tensors
        obj = draw(st.recursive(st.none() | st.booleans() | INTS | WORDS,
                                lambda c: st.lists(c, max_size=3)
                                | st.dictionaries(WORDS, c, max_size=3), max_leaves=6))
        target.write_bytes(__import__("pickle").dumps(obj))
    elif kind == "evil":
        target.write_bytes(__import__("pickle").dumps({"<e>": _Opens(folder / "PWNED")}))
    elif kind == "garbage":
        target = path.with_suffix(draw(st.sampled_from([".safetensors", suffix])))
        target.write_bytes(draw(st.binary(min_size=1, max_size=1000)))
    elif kind == "empty":
        target = path.with_suffix(draw(st.sampled_from([".safetensors", suffix])))
        target.write_bytes(b"")
    elif kind == "a1111":
        params = draw(st.sampled_from([{}, 5, [torch.randn(32)],
                                       {"*": torch.randn(32), "+": torch.randn(32)}]))
        torch.save({"string_to_param": params, "name": "x"}, target)
    else:  # tensors inside the wrong container
        torch.save(draw(st.sampled_from([[torch.randn(32)], {"<e>": [torch.randn(32)]},
                                         {1: torch.randn(32), "a": 1}])), target)
    return target


@pytest.mark.parametrize("kind", EMBEDDING_KINDS)
@cases(4)
@given(data=st.data())
def test_broken_embedding(ws, kind, data):
    with scratch(ws) as case:
        path = data.draw(broken_embedding(case, kind), label="embedding")
        argv = reconstruct_argv(ws, "--embedding", path)
        argv.remove("--invert")
        rf(ws, argv, path)
        assert not (case / "PWNED").exists()


# ---------------------------------------------------------------------------- meshes


TEXTURED = "mtllib m.mtl\nusemtl skin\n"


MESH_KINDS = ["missing", "garbage", "suffix", "untextured", "no-mtl", "no-texture", "faces",
              "nonfinite", "no-faces", "coincident", "words"]


@st.composite
def broken_mesh(draw, folder: Path, kind: str):
    """Write an OBJ that `rf render-gt` cannot use; returns (path, names the error may use)."""
    (folder / "m.mtl").write_text("newmtl skin\nmap_Kd skin.png\n")
    Image.new("RGB", (4, 4), "red").save(folder / "skin.png")
    tri = "v 0 0 0\nv 1 0 0\nv 0 1 0\nf 1 2 3\n"
    path = folder / f"{kind}.obj"
    if kind == "missing":
        path = folder / f"{draw(WORDS)}.obj"
    elif kind == "garbage":
        path.write_bytes(draw(st.binary(max_size=1000)))
    elif kind == "suffix":
        path = folder / f"mesh{draw(st.sampled_from(['.ply', '.stl', '.glb', '.txt', '']))}"
        path.write_text(TEXTURED + tri)
    elif kind == "untextured":
        path.write_text(tri)
    elif kind == "no-mtl":
        path.write_text("mtllib gone.mtl\nusemtl skin\n" + tri)
        return path, [path.name]
    elif kind == "no-texture":
        (folder / "m.mtl").write_text("newmtl skin\nmap_Kd gone.png\n")
        path.write_text(TEXTURED + tri)
        return path, [path.name, "m.mtl"]
    elif kind == "faces":  # an index past the last vertex
        path.write_text(TEXTURED + f"v 0 0 0\nv 1 0 0\nv 0 1 0\nf 1 2 {draw(st.integers(4, 99))}\n")
    elif kind == "nonfinite":
        bad = draw(st.sampled_from(["nan", "inf", "-inf"]))
        path.write_text(TEXTURED + f"v 0 0 0\nv {bad} 0 0\nv 0 1 0\nf 1 2 3\n")
    elif kind == "no-faces":
        path.write_text(TEXTURED + "v 0 0 0\nv 1 0 0\nv 0 1 0\n")
    elif kind == "coincident":
        x, y, z = draw(st.tuples(FINITE, FINITE, FINITE))
        path.write_text(TEXTURED + f"v {x} {y} {z}\n" * 3 + "f 1 2 3\n")
    else:
        path.write_text(TEXTURED + f"v {draw(WORDS)} 0 0\nv 1 0 0\nv 0 1 0\nf 1 2 3\n")
    return path, [path]


def render_gt_argv(ws, mesh, *extra):
    return ["render-gt", mesh, "--out", ws.root / "gt", "--views", "2", "--size", "16", *extra]


@pytest.mark.parametrize("kind", MESH_KINDS)
@cases(3)
@given(data=st.data())
def test_broken_mesh(ws, kind, data):
    with scratch(ws) as case:
        path, names = data.draw(broken_mesh(case, kind), label="mesh")
        rf(ws, render_gt_argv(ws, path), *names)


@cases(16)
@given(flag=st.sampled_from(["--radius", "--fov"]), data=st.data())
def test_bad_render_gt_camera(ws, flag, data):
    if flag == "--radius":  # the mesh is normalised to radius 0.8: the camera must be outside
        value = data.draw(st.floats(max_value=0.8) | NONFINITE, label="radius")
    else:
        value = data.draw(st.floats(max_value=0.0) | st.floats(min_value=180.0) | NONFINITE,
                          label="fov")
    rf(ws, render_gt_argv(ws, "pybullet_data:duck.obj", f"{flag}={value}"), flag)


# ---------------------------------------------------------------------------- dataset manifests


TRAVERSAL = st.sampled_from(["..", ".", "../..", "/", "~"]).flatmap(
    lambda head: WORDS.map(lambda w: f"{head}/{w}"))


MANIFEST_KINDS = ["no-image-column", "empty", "header-only", "missing-files", "not-json",
                  "unknown-column", "bad-view", "folder-image"]


@st.composite
def unusable_manifest(draw, folder: Path, kind: str):
    """A CSV or JSONL manifest of which no row can be used; returns its path."""
    csv = kind in ("no-image-column", "header-only") or (
        kind not in ("not-json",) and draw(st.booleans()))
    rows: list[dict] = []
    n = draw(st.integers(1, 3))
    if kind == "missing-files":
        rows = [{"name": draw(TRAVERSAL | WORDS), "image": draw(TRAVERSAL | WORDS) + ".png"}
                for _ in range(n)]
    elif kind == "unknown-column":
        column = draw(st.sampled_from([c for c in MANIFEST_COLUMNS if c != "image"])
                      .flatmap(typo_of).filter(lambda c: c not in MANIFEST_COLUMNS))
        rows = [{"image": str(ROOT / "examples" / "duck.png"), column: "x"}] * n
    elif kind == "bad-view":
        view = draw(st.sampled_from(["x", "-1", "1.5", "true"]) | st.integers(-9, -1)
                    | FRACTIONAL | st.booleans())
        rows = [{"image": str(ROOT / "examples" / "duck.png"), "input_view": view}]
    elif kind == "folder-image":
        rows = [{"image": str(folder)}]
    if kind == "empty":
        path = folder / f"m{'.csv' if csv else '.jsonl'}"
        path.write_text(draw(st.sampled_from(["", "\n", "\n\n   \n"])))
    elif kind == "not-json":
        path = folder / "m.jsonl"
        lines = draw(st.lists(st.sampled_from(["{", "[1, 2]", "3", '"x"', "nope", "{'a': 1}"]),
                              min_size=1, max_size=3))
        path.write_text("\n".join(lines) + "\n")
    elif kind == "no-image-column":
        path = folder / "m.csv"
        columns = draw(st.lists(st.sampled_from([c for c in MANIFEST_COLUMNS if c != "image"])
                                | WORDS.filter(lambda w: w != "image"), min_size=1, max_size=3,
                                unique=True))
        path.write_text(",".join(columns) + "\n" + ",".join("x" for _ in columns) + "\n")
    elif kind == "header-only":
        path = folder / "m.csv"
        path.write_text("name,image,mask\n")
    elif csv:
        path = folder / "m.csv"
        columns = sorted({k for row in rows for k in row})
        path.write_text("\n".join([",".join(columns)] + [
            ",".join(str(row.get(c, "")) for c in columns) for row in rows]) + "\n")
    else:
        path = folder / "m.jsonl"
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.mark.parametrize("kind", MANIFEST_KINDS)
@cases(4)
@given(data=st.data())
def test_unusable_manifest(ws, kind, data):
    with scratch(ws) as case:
        path = data.draw(unusable_manifest(case, kind), label="manifest")
        rf(ws, dataset_argv(ws, path), path)


@cases(40)
@given(name=st.text(max_size=30) | TRAVERSAL)
def test_object_names_stay_inside_the_results_folder(name):
    base = Path("/results")
    safe = object_name(name)
    assert safe and safe not in (".", "..") and not safe.startswith(".")
    assert "/" not in safe and "\\" not in safe and "\0" not in safe
    assert (base / safe).parent == base


@cases(10)
@given(names=st.lists(TRAVERSAL | WORDS, min_size=2, max_size=4))
def test_duplicate_names_become_bad_rows(ws, names):
    """Rows whose (made-safe) names collide: the first is kept, the others are reported."""
    with scratch(ws) as case:
        path = case / "m.jsonl"
        rows = [{"name": names[0], "image": str(ws.photo)}] + [
            {"name": n, "image": str(ws.photo)} for n in names]
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
        objects, bad = read_dataset(path)
        safe = [object_name(n) for n in [names[0], *names]]
        assert [o.name for o in objects] == list(dict.fromkeys(safe))
        assert len(bad) == len(rows) - len(objects)
        assert all("duplicate object name" in b.error for b in bad)


# ---------------------------------------------------------------------------- sweep files


def _sweep(ws) -> dict:
    return {"name": "bad", "image": str(ws.photo), "mask": str(ws.mask), "preset": "tiny",
            "overrides": ["recon.steps=2"],
            "space": {"recon.weights.entropy": {"loguniform": [1.0e-3, 1.0]}}}


INT_LEAVES = [leaf for leaf in RECONSTRUCT if leaf.kind == "int"]
SWEEP_KEYS = sorted(f.name for f in dataclasses.fields(SweepSpec))


SWEEP_KINDS = ["typo", "missing", "image", "objects", "distribution", "integer", "nonfinite",
               "path", "objective", "resources", "reduction", "override"]


@st.composite
def broken_sweep(draw, ws, kind: str):
    """(sweep dict, names the error must use) for one mistake in an otherwise good sweep."""
    data = _sweep(ws)
    if kind == "typo":
        key = draw(st.sampled_from(SWEEP_KEYS))
        typo = draw(typo_of(key).filter(lambda k: k not in SWEEP_KEYS))
        data[typo] = data.get(key, 1)
        return data, [typo]
    if kind == "missing":
        key = draw(st.sampled_from(["name", "image", "space"]))
        del data[key]
        return data, [key]
    if kind == "image":
        data[draw(st.sampled_from(["image", "mask"]))] = draw(
            WORDS.map(lambda w: f"{w}.png") | st.just(str(ws.inputs)))
        return data, ["image", "mask"]
    if kind == "objects":  # a set of objects that is missing or not a dataset
        del data["image"], data["mask"]
        data["objects"] = draw(WORDS.map(lambda w: f"{w}.jsonl") | WORDS.map(lambda w: f"{w}/")
                               | st.just(str(ws.photo)) | st.just("pybullet:99"))
        return data, ["objects"]
    if kind == "distribution":
        name = draw(WORDS.filter(lambda w: w not in ("uniform", "loguniform", "quniform",
                                                     "randint", "choice", "grid")))
        data["space"] = {"recon.weights.entropy": {name: [0.1, 1.0]}}
        return data, ["recon.weights.entropy"]
    if kind == "integer":  # an integer field under a distribution of fractions
        leaf = draw(st.sampled_from(INT_LEAVES))
        rng = field_range(leaf.field)
        lo = max(1, int(rng.lo) + 1) if rng is not None and rng.lo is not None else 1
        hi = lo + draw(st.integers(1, 50))
        if rng is not None and rng.hi is not None:
            lo, hi = int(rng.hi) - 1, int(rng.hi)
        dist = draw(st.sampled_from(["uniform", "loguniform", "quniform"]))
        args = [lo, hi, draw(FRACTIONAL.filter(lambda q: 0 < q < 1))] if dist == "quniform" \
            else [lo, hi]
        data["space"] = {leaf.key: {dist: args}}
        return data, [leaf.key]
    if kind == "nonfinite":
        dist = draw(st.sampled_from(["uniform", "loguniform", "quniform", "choice", "grid"]))
        args = {"uniform": [0.1, 1.0], "loguniform": [0.1, 1.0], "quniform": [0.1, 1.0, 0.1],
                "choice": [0.1, 1.0], "grid": [0.1, 1.0]}[dist]
        args[draw(st.integers(0, len(args) - 1))] = draw(NONFINITE)
        data["space"] = {"recon.weights.entropy": {dist: args}}
        return data, ["recon.weights.entropy"]
    if kind == "path":
        leaf = draw(st.sampled_from(RECONSTRUCT))
        parts = leaf.key.split(".")
        typo = draw(typo_of(parts[-1]).filter(
            lambda t: t not in field_names(ReconstructJobConfig, parts[:-1])))
        key = ".".join([*parts[:-1], typo])
        data["space"] = {key: {"choice": [1]}}
        return data, [key]
    if kind == "objective":
        data["objective"] = {"input_psnr": draw(NONFINITE | WORDS | LISTS | st.booleans())}
        return data, ["objective"]
    if kind == "resources":
        data["resources"] = {draw(st.sampled_from(["cpu", "gpu"])):
                             draw(NONFINITE | st.floats(max_value=-1e-3) | WORDS)}
        return data, ["resources"]
    if kind == "reduction":
        data["scheduler"] = {"type": "asha", "reduction_factor":
                             draw(NONFINITE | st.floats(max_value=1.0) | WORDS)}
        return data, ["reduction_factor"]
    leaf = draw(st.sampled_from(RECONSTRUCT))
    data["overrides"] = [override(leaf.key, draw(WRONG_TYPE[leaf.kind]))]
    return data, [key_named(leaf.key)]


@pytest.mark.parametrize("kind", SWEEP_KINDS)
@cases(4)
@given(data=st.data())
def test_broken_sweep_file(ws, kind, data):
    sweep, names = data.draw(broken_sweep(ws, kind), label="sweep")
    with scratch(ws) as case:
        path = case / "sweep.yaml"
        path.write_text(yaml.safe_dump(sweep))
        line = rf(ws, ["sweep", path, "--storage", ws.root / "sweeps", "--tracking-uri",
                       ws.track], *names)
        assert str(path) in line


@pytest.mark.parametrize("text", ["", "a: [\n", "- 1\n", "just words\n", "name: x\n"])
def test_unreadable_sweep_file(ws, text):
    with scratch(ws) as case:
        path = case / "sweep.yaml"
        path.write_text(text)
        rf(ws, ["sweep", path, "--storage", ws.root / "sweeps", "--tracking-uri", ws.track], path)


def test_presets_and_tune_configs_still_load(monkeypatch):
    for name in preset_names():
        assert load_job_config(name).recon.steps >= 1
    monkeypatch.chdir(ROOT)  # their image paths start from the repository root
    for path in sorted((ROOT / "tune_configs").glob("*.yaml")):
        assert load_sweep(path).space, path


# ---------------------------------------------------------------------------- output paths


def _foreign(folder: Path, files: dict[str, bytes]) -> None:
    folder.mkdir()
    for name, content in files.items():
        (folder / name).write_bytes(content)


FOREIGN = st.dictionaries(WORDS, st.binary(max_size=64), min_size=1, max_size=3)


@cases(12)
@given(command=st.sampled_from(["reconstruct", "render-gt", "dataset"]), files=FOREIGN)
def test_overwrite_refuses_a_folder_rf_did_not_write(ws, command, files):
    with scratch(ws) as case:
        out = case / "mine"
        _foreign(out, files)
        argv = {"reconstruct": lambda: reconstruct_argv(ws),
                "render-gt": lambda: render_gt_argv(ws, "pybullet_data:duck.obj"),
                "dataset": lambda: dataset_argv(ws, ws.manifest)}[command]()
        argv[argv.index("--out") + 1] = out
        rf(ws, [*argv, "--overwrite"] if command != "dataset" else argv, out)


@cases(6)
@given(content=st.binary(max_size=64))
def test_invert_refuses_a_file_rf_did_not_write(ws, content):
    with scratch(ws) as case:
        out = case / "mine.safetensors"
        out.write_bytes(content)
        argv = invert_argv(ws)
        argv[argv.index("--out") + 1] = out
        rf(ws, argv, out)


@pytest.mark.parametrize("command", ["reconstruct", "invert", "render-gt", "dataset"])
@pytest.mark.parametrize("where", ["under-a-file", "is-a-file", "input-folder", "input-file"])
def test_out_path(ws, command, where):
    """``--out`` below a file, a file, the folder of the inputs, or an input itself."""
    argv = {"reconstruct": lambda: reconstruct_argv(ws), "invert": lambda: invert_argv(ws),
            "render-gt": lambda: render_gt_argv(ws, ws.duck),
            "dataset": lambda: dataset_argv(ws, ws.manifest)}[command]()
    with scratch(ws) as case:
        (case / "file").write_text("x")
        out = {"under-a-file": case / "file" / "out.safetensors", "is-a-file": case / "file",
               "input-folder": ws.duck.parent if command == "render-gt" else ws.inputs,
               "input-file": argv[1]}[where]
        argv[argv.index("--out") + 1] = out
        rf(ws, argv, out)


@pytest.fixture(scope="module")
def finished_run(ws):
    """A finished two-step run (for `rf export`), made once."""
    from rf_core.jobs.reconstruct_job import reconstruct
    from rf_core.progress import quiet

    run = ws.root / "finished"
    with quiet():
        reconstruct(ws.photo, ws.mask, run, load_job_config("tiny", overrides=TINY),
                    learn_embedding=True)
    return run


EXPORT = [leaf for leaf in RECONSTRUCT if leaf.key.startswith("export.")]


@pytest.mark.parametrize("leaf", EXPORT, ids=repr)
@cases(3)
@given(data=st.data())
def test_export_config(ws, finished_run, leaf, data):
    """``rf export RUN video.frames=...``: a bad value leaves the finished run untouched."""
    key = leaf.key.removeprefix("export.")
    value = data.draw(WRONG_TYPE[leaf.kind] | outside(leaf) if field_range(leaf.field)
                      else WRONG_TYPE[leaf.kind], label="value")
    rf(ws, ["export", finished_run, override(key, value)], key_named(key))


@pytest.mark.parametrize("what", ["missing", "empty", "file", "not-a-run"])
def test_export_needs_a_run_folder(ws, what):
    with scratch(ws) as case:
        run = case / "run"
        if what == "empty":
            run.mkdir()
        elif what == "file":
            run.write_text("x")
        elif what == "not-a-run":
            _foreign(run, {"metrics.json": b"{}"})
            (run / "checkpoint").mkdir()
        rf(ws, ["export", run], run)
