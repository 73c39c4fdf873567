"""Readers that turn datasets on disk into `Split`s and `DatasetSplits`, without decoding images.

Supported layouts: an ImageFolder tree (`root/<class>/<image>`), a CSV or JSONL manifest, and the
three standard DML benchmarks in the layout their archives extract to (CUB-200-2011, Cars196 with
`cars_annos.mat`, Stanford Online Products). Benchmarks are split by class into train and test as
the DML literature does (e.g. DiVA's and PML's dataset code): zero-shot retrieval, no class
shared between the two.
Every malformed input raises `DatasetError` with a one-line message that says what to fix.
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import numpy as np
import scipy.io

from training.data.records import DatasetError, DatasetSplits, Split

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})

# Class-id ranges of the DML train/test splits (the convention of DiVA's datasets/ and PML's).
CUB200_LAST_TRAIN_CLASS = 100  # classes 1-100 train, 101-200 test
CARS196_LAST_TRAIN_CLASS = 98  # classes 1-98 train, 99-196 test, ignoring the `test` flag

SOP_HEADER = ["image_id", "class_id", "super_class_id", "path"]
MANIFEST_SUFFIXES = (".csv", ".jsonl", ".ndjson")


def is_image_file(path: Path) -> bool:
    """A visible file with one of the image extensions, compared case-insensitively."""
    return not path.name.startswith(".") and path.suffix.lower() in IMAGE_EXTENSIONS


# torchvision's `ImageFolder.find_classes`/`make_dataset` are not used: they take hidden folders and
# files (`.ipynb_checkpoints`, macOS `._x.jpg` resource forks) for classes and images.
def read_image_folder(root: Path) -> Split:
    """Read `root/<class>/<image>`: one sub-folder per class, sorted by name for determinism."""
    root = _require_dir(Path(root), "image folder")
    items: list[tuple[Path, str]] = []
    for class_dir in sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")):
        images = sorted(p for p in class_dir.iterdir() if p.is_file() and is_image_file(p))
        if not images:
            logger.warning("skipping class folder %s: it holds no images", class_dir)
        items.extend((path, class_dir.name) for path in images)
    if not items:
        extensions = "/".join(sorted(ext.lstrip(".") for ext in IMAGE_EXTENSIONS))
        raise DatasetError(f"no images in {root}; expected {root}/<class>/<image>.{{{extensions}}}")
    return Split.from_named(items)


def read_manifest(path: Path) -> dict[str, Split]:
    """Read a CSV (header `path,label[,split]`) or JSONL manifest into one `Split` per split name.

    Relative image paths are resolved against the manifest's folder; a manifest without a split
    column puts everything in split "all". Extra columns are ignored.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise DatasetError(f"manifest {path} does not exist; pass an existing .csv or .jsonl file")
    suffix = path.suffix.lower()
    if suffix not in MANIFEST_SUFFIXES:
        raise DatasetError(f"manifest {path} must end in .csv or .jsonl, not {suffix or '(none)'}")
    rows = _csv_rows(path) if suffix == ".csv" else _jsonl_rows(path)
    by_split = _group_manifest_rows(rows, path)
    for split_name, items in by_split.items():
        _require_existing([p for p, _ in items], f"{path} (split {split_name})")
    return {name: Split.from_named(items) for name, items in by_split.items()}


def read_cub200(root: Path) -> DatasetSplits:
    """Read CUB-200-2011 from `CUB_200_2011/` (or its parent): images.txt, labels, classes.txt."""
    base = _locate(Path(root), "images.txt", "CUB_200_2011", "cub200")
    image_paths = dict(_read_table(base / "images.txt", 2))
    image_classes = dict(_read_table(base / "image_class_labels.txt", 2))
    class_rows = _read_table(base / "classes.txt", 2)
    class_names = {_parse_int(cid, base / "classes.txt"): name for cid, name in class_rows}
    items: list[tuple[Path, int]] = []
    for image_id, relative_path in image_paths.items():
        if image_id not in image_classes:
            raise DatasetError(
                f"image {image_id} of {base / 'images.txt'} has no line in image_class_labels.txt"
            )
        class_id = _parse_int(image_classes[image_id], base / "image_class_labels.txt")
        items.append((base / "images" / relative_path, class_id))
    return _split_by_class_id("cub200", base, items, class_names, CUB200_LAST_TRAIN_CLASS)


def read_cars196(root: Path) -> DatasetSplits:
    """Read Cars196 from the folder holding `cars_annos.mat` and `car_ims/`."""
    root = _require_dir(Path(root), "cars196 root")
    annotations_file = root / "cars_annos.mat"
    if not annotations_file.is_file():
        raise DatasetError(f"{annotations_file} not found; point cars196: at the folder holding it")
    try:
        mat = scipy.io.loadmat(annotations_file, squeeze_me=True)
        annotations = np.atleast_1d(mat["annotations"])
        relative_paths = [str(p) for p in annotations["relative_im_path"]]
        class_ids = [int(c) for c in annotations["class"]]
        names = [str(n) for n in np.atleast_1d(mat["class_names"])]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise DatasetError(
            f"{annotations_file} is not the Cars196 annotation file (needs `annotations` with "
            f"`relative_im_path` and `class`, and `class_names`): {error}"
        ) from error
    if not all(1 <= c <= len(names) for c in class_ids):
        raise DatasetError(f"{annotations_file} has class ids outside 1..{len(names)}")
    class_names = {class_id: name for class_id, name in enumerate(names, start=1)}
    items = [(root / p, c) for p, c in zip(relative_paths, class_ids, strict=True)]
    return _split_by_class_id("cars196", root, items, class_names, CARS196_LAST_TRAIN_CLASS)


def read_sop(root: Path) -> DatasetSplits:
    """Read Stanford Online Products from `Stanford_Online_Products/` (or its parent)."""
    base = _locate(Path(root), "Ebay_train.txt", "Stanford_Online_Products", "sop")
    train, test = (_read_sop_list(base, f"Ebay_{part}.txt") for part in ("train", "test"))
    return _checked_dataset("sop", base, train, test)


def check_trainable(split: Split) -> None:
    """Fail early when a split cannot give positive pairs: 2+ classes with 2+ images each."""
    if split.num_classes < 2:
        raise DatasetError(
            f"the training split has {split.num_classes} class; metric learning needs at least 2"
        )
    counts = split.class_counts()
    for label, name in enumerate(split.class_names):
        if counts[label] < 2:
            raise DatasetError(
                f"class {name} has {counts[label]} image{'s' * (counts[label] != 1)}; "
                "metric learning needs at least 2 per class"
            )


def load_dataset(spec: str) -> DatasetSplits:
    """Load a dataset from a spec: `DIR`, `imagefolder:DIR`, `cub200:PATH`, `cars196:PATH`,
    `sop:PATH` or `manifest:FILE` (a manifest with `train` and `test` splits)."""
    kind, separator, location = spec.partition(":")
    if not separator or (kind not in _DATASET_READERS and Path(spec).expanduser().exists()):
        return _read_train_test_folders(Path(spec).expanduser())
    if kind not in _DATASET_READERS:
        kinds = ", ".join(f"{k}:PATH" for k in _DATASET_READERS)
        raise DatasetError(f"unknown dataset kind {kind!r} in {spec!r}; use DIR or one of {kinds}")
    if not location:
        raise DatasetError(f"dataset spec {spec!r} has no path after '{kind}:'")
    return _DATASET_READERS[kind](Path(location).expanduser())


def _read_train_test_folders(root: Path) -> DatasetSplits:
    root = _require_dir(root, "dataset folder")
    for part in ("train", "test"):
        if not (root / part).is_dir():
            raise DatasetError(
                f"{root} has no {part}/ folder; expected {root}/train/<class>/<image> "
                f"and {root}/test/<class>/<image>"
            )
    train, test = read_image_folder(root / "train"), read_image_folder(root / "test")
    return _checked_dataset(root.name, root, train, test)


def _read_manifest_dataset(path: Path) -> DatasetSplits:
    splits = read_manifest(path)
    missing = [name for name in ("train", "test") if name not in splits]
    if missing:
        raise DatasetError(
            f"manifest {path} has no {' or '.join(missing)} rows; "
            f"give it a split column with train and test (found: {', '.join(sorted(splits))})"
        )
    return _checked_dataset(path.stem, path.parent, splits["train"], splits["test"])


_DATASET_READERS: dict[str, Callable[[Path], DatasetSplits]] = {
    "imagefolder": _read_train_test_folders,
    "cub200": read_cub200,
    "cars196": read_cars196,
    "sop": read_sop,
    "manifest": _read_manifest_dataset,
}


def _checked_dataset(name: str, root: Path, train: Split, test: Split) -> DatasetSplits:
    """Bundle train and test after checking that both can be used for retrieval."""
    for split_name, split in (("train", train), ("test", test)):
        if split.num_classes < 2:
            raise DatasetError(
                f"the {split_name} split of {name} ({root}) has {split.num_classes} class; "
                "retrieval needs at least 2"
            )
    shared = set(train.class_names) & set(test.class_names)
    if shared:
        logger.warning(
            "%s: %d class names occur in both train and test (e.g. %s); test results then do "
            "not measure retrieval of unseen classes",
            name,
            len(shared),
            sorted(shared)[0],
        )
    return DatasetSplits(name=name, train=train, test=test, root=root)


def _split_by_class_id(
    name: str,
    root: Path,
    items: list[tuple[Path, int]],
    class_names: Mapping[int, str],
    last_train_class: int,
) -> DatasetSplits:
    """Split (path, class id) pairs at a class id, keeping labels in class-id order."""
    _require_existing([path for path, _ in items], f"the {name} index files in {root}")
    train = _split_from_class_ids([it for it in items if it[1] <= last_train_class], class_names)
    test = _split_from_class_ids([it for it in items if it[1] > last_train_class], class_names)
    return _checked_dataset(name, root, train, test)


def _split_from_class_ids(items: list[tuple[Path, int]], class_names: Mapping[int, str]) -> Split:
    class_ids = sorted({class_id for _, class_id in items})
    missing = [c for c in class_ids if c not in class_names]
    if missing:
        raise DatasetError(f"class id {missing[0]} has no name in the dataset's class list")
    label_of = {class_id: label for label, class_id in enumerate(class_ids)}
    return Split(
        paths=[path for path, _ in items],
        labels=[label_of[class_id] for _, class_id in items],
        class_names=[class_names[class_id] for class_id in class_ids],
    )


def _read_sop_list(base: Path, file_name: str) -> Split:
    list_file = base / file_name
    if not list_file.is_file():
        raise DatasetError(f"{list_file} not found; SOP needs Ebay_train.txt and Ebay_test.txt")
    rows = _read_table(list_file, len(SOP_HEADER), header=SOP_HEADER)
    items = [(base / path, _parse_int(class_id, list_file)) for _, class_id, _, path in rows]
    _require_existing([path for path, _ in items], str(list_file))
    return _split_from_class_ids(items, {class_id: str(class_id) for _, class_id in items})


def _read_table(path: Path, columns: int, header: list[str] | None = None) -> list[list[str]]:
    """Whitespace-separated rows of exactly `columns` fields (the last may contain spaces)."""
    if not path.is_file():
        raise DatasetError(f"{path} not found; the dataset folder is incomplete")
    lines = path.read_text(encoding="utf-8").splitlines()
    if header is not None:
        if not lines or lines[0].split() != header:
            raise DatasetError(f"{path} must start with the header line {' '.join(header)!r}")
        lines = lines[1:]
    rows = []
    first_data_line = 2 if header else 1
    for number, line in enumerate(lines, start=first_data_line):
        if not line.strip():
            continue
        fields = line.split(maxsplit=columns - 1)
        if len(fields) != columns:
            raise DatasetError(f"{path}:{number} has {len(fields)} fields, expected {columns}")
        rows.append(fields)
    if not rows:
        raise DatasetError(f"{path} lists nothing; the dataset folder is incomplete")
    return rows


def _parse_int(text: str, source: Path) -> int:
    try:
        return int(text)
    except ValueError:
        raise DatasetError(f"{source} has {text!r} where an integer id belongs") from None


def _csv_rows(path: Path) -> list[tuple[int, Mapping[str, object]]]:
    with path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in ("path", "label") if c not in (reader.fieldnames or [])]
        if missing:
            raise DatasetError(f"manifest {path} needs a header with path,label; missing {missing}")
        return [(reader.line_num, row) for row in reader]


def _jsonl_rows(path: Path) -> list[tuple[int, Mapping[str, object]]]:
    rows: list[tuple[int, Mapping[str, object]]] = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise DatasetError(f"{path}:{number} is not valid JSON: {error.msg}") from None
        if not isinstance(row, dict):
            raise DatasetError(f"{path}:{number} must be a JSON object with path and label")
        rows.append((number, row))
    return rows


def _group_manifest_rows(
    rows: Iterable[tuple[int, Mapping[str, object]]], manifest: Path
) -> dict[str, list[tuple[Path, str]]]:
    """(path, class name) pairs per split; every row needs a split once any row has one."""
    grouped: dict[str, list[tuple[Path, str]]] = {}
    split_given: set[bool] = set()
    for number, row in rows:
        image, label = (_manifest_field(row, key, manifest, number) for key in ("path", "label"))
        split = row.get("split")
        split_given.add(split not in (None, ""))
        if len(split_given) > 1:
            raise DatasetError(
                f"{manifest}:{number}: some rows have a split and some do not; give every row one"
            )
        image_path = Path(image).expanduser()
        grouped.setdefault(str(split) if split else "all", []).append(
            (image_path if image_path.is_absolute() else manifest.parent / image_path, label)
        )
    if not grouped:
        raise DatasetError(f"manifest {manifest} has no rows")
    return grouped


def _manifest_field(row: Mapping[str, object], key: str, manifest: Path, number: int) -> str:
    value = row.get(key)
    if value is None or str(value).strip() == "":
        raise DatasetError(f"{manifest}:{number} has no {key}")
    return str(value).strip()


def _locate(root: Path, marker: str, subfolder: str, kind: str) -> Path:
    """The dataset folder itself, or its `subfolder` when given the folder above it."""
    root = _require_dir(root, f"{kind} root")
    for candidate in (root, root / subfolder):
        if (candidate / marker).is_file():
            return candidate
    raise DatasetError(
        f"{marker} not found in {root} or {root / subfolder}; point {kind}: at {subfolder}/"
    )


def _require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise DatasetError(f"{what} {path} does not exist or is not a folder; check the path")
    return path


def _require_existing(paths: list[Path], source: str) -> None:
    missing = [path for path in paths if not path.is_file()]
    if missing:
        raise DatasetError(
            f"{len(missing)} of {len(paths)} images listed in {source} do not exist "
            f"(first: {missing[0]}); fix the paths or the dataset root"
        )
