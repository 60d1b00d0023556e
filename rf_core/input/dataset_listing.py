"""A dataset of objects to reconstruct: a folder or a manifest, read into ``DatasetObject``s.

Accepted inputs (paths in a manifest are relative to the manifest's folder):

- **a folder of objects**, one entry per object:
  - a subfolder with ``image.*`` (+ ``mask.*``) or ``rgba.*`` (any image format, e.g.
    ``image.jpg`` + ``mask.png``), as in the RealFusion examples; other image names work when
    the subfolder holds exactly one image;
  - a subfolder written by ``rf render-gt`` (``cameras.json``, ``rgb/``, ``mask/``): view 0 is
    the photo and the folder is its ground truth;
  - an image file in any format rf reads (``rf_core.input.photo_file``: PNG, JPEG, WebP, AVIF, GIF,
    TIFF, BMP, ...): RGBA, or RGB when a background remover is installed. Any other file is
    listed as skipped, with the reason.
- **a manifest**, ``.csv`` (with a header) or ``.jsonl``, one object per row. Columns:
  ``image`` (required), ``mask``, ``gt`` (an ``rf render-gt`` folder the photo is view
  ``input_view`` of), ``input_view`` (default 0), ``mesh`` (GT mesh replacing the one
  ``gt/cameras.json`` names), ``embedding`` (a learned token to use instead of inversion),
  ``initializer`` (the word textual inversion starts the token from, e.g. ``cat``; default
  the config's ``inversion.initializer``), ``name`` (default: the image's file stem, or its
  folder's name for ``image.png``).

Rows that cannot be used (a missing file, a bad value, a duplicate name) become ``BadRow``s
with a one-line reason, so one bad row never stops the others. Object names keep letters of
any script (``写真.png`` is the object ``写真``).
"""

from __future__ import annotations

import csv
import json
import os
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path

from rf_core.errors import UserError
from rf_core.input.photo_file import image_suffixes

MANIFEST_COLUMNS = ("name", "image", "mask", "gt", "input_view", "mesh", "embedding",
                    "initializer")
_UNSAFE = re.compile("\0+")
_NAME_BYTES = 120
"""Longest object name in UTF-8 bytes (folder names may hold 255; MLflow and logs like less)."""


class DatasetError(UserError, ValueError):
    """The dataset as a whole cannot be used (missing, empty, unreadable)."""


@dataclass
class DatasetObject:
    """One object of a dataset: its photo and, optionally, ground truth and a learned token."""

    name: str
    """Unique within the dataset; names the object's result folder and MLflow run."""
    image: Path
    mask: Path | None = None
    gt: Path | None = None
    """``rf render-gt`` folder; the photo is its view ``input_view``."""
    input_view: int = 0
    mesh: Path | str | None = None
    """GT mesh (a path or ``pybullet_data:NAME.obj``) replacing the one ``gt`` names."""
    embedding: Path | None = None
    """Learned token file (.safetensors or learned_embeds.bin); None: invert the photo."""
    initializer: str | None = None
    """Word that starts textual inversion (e.g. ``cat``); None: ``inversion.initializer``."""


@dataclass
class BadRow:
    """An entry that cannot be reconstructed, and why."""

    where: str
    """``manifest.csv line 4`` or the entry's path."""
    error: str
    name: str | None = None
    skipped: bool = False
    """Not an object at all (a file that is no image): listed as skipped, not failed."""


def object_name(text: str) -> str:
    """A folder- and MLflow-safe object name: letters and digits of any script, ``_ . -``;
    anything else (separators, spaces, control characters) becomes ``_``."""
    text = unicodedata.normalize("NFC", text)
    marked = "".join(c if unicodedata.category(c)[0] in "LMN" or c in "_.-" else "\0"
                     for c in text)
    safe = _UNSAFE.sub("_", marked).strip("._")
    while len(safe.encode()) > _NAME_BYTES:
        safe = safe[:-1].rstrip("._")
    return safe or "object"


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in image_suffixes()


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and is_image_file(p))


def _named(images: list[Path], stem: str) -> Path | None:
    """The image called ``stem.*`` (any image suffix; PNG first), if there is one."""
    found = [p for p in images if p.stem.lower() == stem]
    return sorted(found, key=lambda p: (p.suffix.lower() != ".png", p.name))[0] if found else None


def _from_subfolder(folder: Path) -> DatasetObject:
    name = object_name(folder.name)
    if (folder / "cameras.json").is_file() and (folder / "rgb").is_dir():
        mask = folder / "mask" / "000.png"
        return DatasetObject(name, folder / "rgb" / "000.png", mask if mask.is_file() else None,
                             gt=folder, input_view=0)
    images = _images_in(folder)
    image, mask, rgba = (_named(images, s) for s in ("image", "mask", "rgba"))
    if image is not None:
        return DatasetObject(name, image, mask)
    if rgba is not None:
        return DatasetObject(name, rgba)
    if len(images) == 1:
        return DatasetObject(name, images[0])
    raise ValueError(f"{folder} holds {len(images)} images; name the photo image.* (and its "
                     "mask mask.*) or list the objects in a manifest")


def _read_folder(root: Path) -> tuple[list[DatasetObject], list[BadRow]]:
    objects, bad = [], []
    for entry in sorted(root.iterdir()):
        if entry.name.startswith("."):
            continue
        try:
            if entry.is_dir():
                objects.append(_from_subfolder(entry))
            elif is_image_file(entry):
                objects.append(DatasetObject(object_name(entry.stem), entry))
            else:
                kind = f"a {entry.suffix} file" if entry.suffix else "a file without a suffix"
                bad.append(BadRow(str(entry), f"skipped: {kind}, not an image format rf reads",
                                  skipped=True))
        except ValueError as err:
            bad.append(BadRow(str(entry), str(err), object_name(entry.name)))
    return objects, bad


def _manifest_rows(path: Path) -> list[tuple[str, dict | None, str | None]]:
    """(where, row or None, error) for every data row of a CSV or JSONL manifest."""
    text = path.read_text(encoding="utf-8-sig")
    rows: list[tuple[str, dict | None, str | None]] = []
    if path.suffix.lower() == ".csv":
        reader = csv.DictReader(text.splitlines())
        if not reader.fieldnames or "image" not in [f.strip() for f in reader.fieldnames]:
            raise DatasetError(f"{path}: the CSV header must name an 'image' column (columns: "
                               f"{', '.join(MANIFEST_COLUMNS)})")
        for i, row in enumerate(reader, start=2):
            if None in row:  # more cells than header columns
                rows.append((f"{path.name} line {i}", None, "more cells than header columns"))
                continue
            rows.append((f"{path.name} line {i}",
                         {k.strip(): (v or "").strip() for k, v in row.items()}, None))
        return rows
    for i, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            rows.append((f"{path.name} line {i}", None, f"not valid JSON ({err.msg})"))
            continue
        if not isinstance(row, dict):
            rows.append((f"{path.name} line {i}", None, "a line must be a JSON object"))
            continue
        rows.append((f"{path.name} line {i}", row, None))
    return rows


def _file(base: Path, value, column: str, *, folder: bool = False) -> Path | None:
    if value in (None, ""):
        return None
    p = Path(str(value)).expanduser()
    p = p if p.is_absolute() else base / p
    if not (p.is_dir() if folder else p.is_file()):
        raise ValueError(f"{column} {str(value)!r} not found ({p})")
    return p


def _view_index(value) -> int:
    """``input_view`` as written in a CSV cell or JSON value -> an index >= 0."""
    if value in (None, ""):
        return 0
    try:
        number = float(value) if not isinstance(value, bool) else None
    except (TypeError, ValueError):
        number = None
    if number is None or not number.is_integer() or number < 0:
        raise ValueError(f"input_view {value!r} is not an integer >= 0 (a view index)")
    return int(number)


def _from_row(base: Path, row: dict) -> DatasetObject:
    unknown = sorted(set(row) - set(MANIFEST_COLUMNS))
    if unknown:
        raise ValueError(f"unknown column(s) {', '.join(unknown)}; use "
                         f"{', '.join(MANIFEST_COLUMNS)}")
    image = _file(base, row.get("image"), "image")
    if image is None:
        raise ValueError("no image given")
    input_view = _view_index(row.get("input_view"))
    gt = _file(base, row.get("gt"), "gt", folder=True)
    if gt is not None and not (gt / "cameras.json").is_file():
        raise ValueError(f"gt {str(row['gt'])!r} is not an `rf render-gt` folder (no "
                         "cameras.json)")
    mesh = row.get("mesh") or None
    if mesh is not None:
        if gt is None:
            raise ValueError("a mesh needs the gt views it was rendered into (column gt)")
        if not str(mesh).startswith("pybullet_data:"):
            mesh = _file(base, mesh, "mesh")
    initializer = str(row.get("initializer") or "").strip() or None
    if initializer is not None and (len(initializer.split()) != 1 or len(initializer) > 40):
        raise ValueError(f"initializer {initializer!r} must be one word (e.g. cat)")
    default_name = image.parent.name if image.stem in ("image", "rgba", "000") else image.stem
    return DatasetObject(object_name(str(row.get("name") or default_name)), image,
                         _file(base, row.get("mask"), "mask"), gt, input_view, mesh,
                         _file(base, row.get("embedding"), "embedding"), initializer)


def _read_manifest(path: Path) -> tuple[list[DatasetObject], list[BadRow]]:
    objects, bad = [], []
    for where, row, error in _manifest_rows(path):
        if error is None:
            try:
                objects.append(_from_row(path.parent, row))
                continue
            except ValueError as err:
                error = str(err)
        name = row.get("name") if isinstance(row, dict) else None
        bad.append(BadRow(where, error, object_name(str(name)) if name else None))
    return objects, bad


def read_dataset(source: str | os.PathLike) -> tuple[list[DatasetObject], list[BadRow]]:
    """The usable objects of a folder or manifest, and the entries that are not.

    Raises ``DatasetError`` when ``source`` is missing, of an unknown kind, or holds nothing.
    """
    path = Path(source)
    if not path.exists():
        raise DatasetError(f"dataset {str(source)!r} not found; pass a folder of objects or a "
                           ".csv/.jsonl manifest")
    if path.is_dir():
        objects, bad = _read_folder(path)
    elif path.suffix.lower() in (".csv", ".jsonl"):
        objects, bad = _read_manifest(path)
    else:
        raise DatasetError(f"{path} is neither a folder nor a .csv/.jsonl manifest")
    seen: dict[str, DatasetObject] = {}
    unique = []
    for obj in objects:
        if obj.name in seen:
            bad.append(BadRow(str(obj.image), f"duplicate object name {obj.name!r} (also "
                              f"{seen[obj.name].image}); give each object its own name"))
            continue
        seen[obj.name] = obj
        unique.append(obj)
    if not unique and not bad:
        raise DatasetError(f"dataset {path} is empty: no object folders, images or manifest rows")
    return unique, bad
