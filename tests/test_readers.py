"""Dataset readers on tiny fixture trees written in each dataset's original layout."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from PIL import Image

from training.data.readers import (
    check_trainable,
    load_dataset,
    read_cars196,
    read_cub200,
    read_image_folder,
    read_manifest,
    read_sop,
)
from training.data.records import DatasetError, Split


def write_image(path: Path, color: tuple[int, int, int] = (200, 30, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image_format = "PNG" if path.suffix.lower() == ".png" else "JPEG"
    Image.new("RGB", (8, 6), color).save(path, image_format)
    return path


def write_image_folder(root: Path, classes: dict[str, int]) -> None:
    for name, count in classes.items():
        for i in range(count):
            write_image(root / name / f"{i}.jpg")


# ImageFolder ----------------------------------------------------------------------------------


def test_image_folder_lists_images_sorted_and_ignores_hidden_and_other_files(tmp_path: Path):
    write_image(tmp_path / "zebra" / "b.PNG")
    write_image(tmp_path / "zebra" / "a.jpg")
    write_image(tmp_path / "ant" / "x.JPEG")
    write_image(tmp_path / "ant" / "._x.jpg")  # macOS resource fork
    write_image(tmp_path / ".ipynb_checkpoints" / "c.jpg")
    (tmp_path / "ant" / "notes.txt").write_text("not an image")
    (tmp_path / "README.jpg").write_text("a file at the root is not a class")

    split = read_image_folder(tmp_path)

    assert split.class_names == ["ant", "zebra"]
    assert split.paths == [
        tmp_path / "ant" / "x.JPEG",
        tmp_path / "zebra" / "a.jpg",
        tmp_path / "zebra" / "b.PNG",
    ]
    assert split.labels == [0, 1, 1]


def test_image_folder_without_images_names_the_expected_layout(tmp_path: Path):
    (tmp_path / "empty_class").mkdir()
    with pytest.raises(DatasetError, match=r"no images in .*<class>/<image>"):
        read_image_folder(tmp_path)


def test_image_folder_that_does_not_exist(tmp_path: Path):
    with pytest.raises(DatasetError, match="does not exist"):
        read_image_folder(tmp_path / "nope")


# Manifests ------------------------------------------------------------------------------------


def test_csv_manifest_with_split_resolves_relative_and_absolute_paths(tmp_path: Path):
    write_image(tmp_path / "img" / "a1.jpg")
    write_image(tmp_path / "img" / "a2.jpg")
    absolute = write_image(tmp_path / "elsewhere" / "b1.jpg")
    write_image(tmp_path / "img" / "c1.jpg")
    manifest = tmp_path / "data.csv"
    manifest.write_text(
        "path,label,split,note\n"
        "img/a1.jpg,cat,train,x\n"
        f"{absolute},bird,train,y\n"
        "img/a2.jpg,cat,train,z\n"
        "img/c1.jpg,dog,test,\n"
    )

    splits = read_manifest(manifest)

    assert set(splits) == {"train", "test"}
    train = splits["train"]
    assert train.class_names == ["bird", "cat"]
    assert train.paths == [tmp_path / "img" / "a1.jpg", absolute, tmp_path / "img" / "a2.jpg"]
    assert train.labels == [1, 0, 1]
    assert splits["test"].class_names == ["dog"]


def test_csv_manifest_without_split_column_is_split_all(tmp_path: Path):
    write_image(tmp_path / "a.jpg")
    manifest = tmp_path / "m.csv"
    manifest.write_text("label,path\nkoala,a.jpg\n")
    assert list(read_manifest(manifest)) == ["all"]
    assert read_manifest(manifest)["all"].paths == [tmp_path / "a.jpg"]


def test_jsonl_manifest_accepts_integer_labels_and_blank_lines(tmp_path: Path):
    for name in ("a", "b", "c"):
        write_image(tmp_path / f"{name}.png")
    manifest = tmp_path / "m.jsonl"
    rows = [
        {"path": "a.png", "label": 7, "split": "train"},
        {"path": "b.png", "label": 3, "split": "train", "character": "天"},
        {"path": "c.png", "label": 7, "split": "val"},
    ]
    manifest.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")

    splits = read_manifest(manifest)

    assert splits["train"].class_names == ["3", "7"]
    assert splits["train"].labels == [1, 0]
    assert splits["val"].paths == [tmp_path / "c.png"]


@pytest.mark.parametrize(
    ("file_name", "content", "message"),
    [
        ("m.csv", "file,label\na.jpg,x\n", r"needs a header with path,label; missing \['path'\]"),
        ("m.csv", "path,label\na.jpg,\n", r"m.csv:2 has no label"),
        ("m.csv", "path,label\n", "has no rows"),
        (
            "m.csv",
            "path,label,split\na.jpg,x,train\na.jpg,x,\n",
            r"m.csv:3: some rows have a split",
        ),
        ("m.csv", "path,label\nmissing.jpg,x\n", r"1 of 1 images listed in .* do not exist"),
        ("m.jsonl", '{"path": "a.jpg", "label": "x"}\n{oops\n', r"m.jsonl:2 is not valid JSON"),
        ("m.jsonl", '["a.jpg", "x"]\n', r"m.jsonl:1 must be a JSON object"),
        ("m.txt", "path,label\n", r"must end in .csv or .jsonl, not .txt"),
    ],
)
def test_manifest_errors_say_what_to_fix(tmp_path: Path, file_name: str, content: str, message):
    write_image(tmp_path / "a.jpg")
    (tmp_path / file_name).write_text(content)
    with pytest.raises(DatasetError, match=message):
        read_manifest(tmp_path / file_name)


def test_missing_manifest(tmp_path: Path):
    with pytest.raises(DatasetError, match=r"manifest .*nope.csv does not exist"):
        read_manifest(tmp_path / "nope.csv")


# CUB-200-2011 ---------------------------------------------------------------------------------

CUB_CLASSES = {1: "001.Black_footed_Albatross", 2: "002.Laysan_Albatross",
               101: "101.White_Pelican", 102: "102.Western_Wood_Pewee"}  # fmt: skip


def write_cub(root: Path, images_per_class: int = 2) -> Path:
    base = root / "CUB_200_2011"
    images, labels = [], []
    for class_id, name in CUB_CLASSES.items():
        for i in range(images_per_class):
            relative = f"{name}/{name.split('.')[1]}_{i:04d}_{class_id}.jpg"
            write_image(base / "images" / relative)
            images.append(relative)
            labels.append(class_id)
    ids = range(1, len(images) + 1)
    (base / "images.txt").write_text(
        "".join(f"{i} {p}\n" for i, p in zip(ids, images, strict=True))
    )
    (base / "image_class_labels.txt").write_text(
        "".join(f"{i} {c}\n" for i, c in zip(ids, labels, strict=True))
    )
    (base / "classes.txt").write_text("".join(f"{c} {n}\n" for c, n in CUB_CLASSES.items()))
    return base


@pytest.mark.parametrize("use_parent", [False, True])
def test_cub200_splits_classes_1_to_100_from_101_to_200(tmp_path: Path, use_parent: bool):
    base = write_cub(tmp_path)

    dataset = read_cub200(tmp_path if use_parent else base)

    assert dataset.name == "cub200"
    assert dataset.root == base
    assert dataset.train.class_names == ["001.Black_footed_Albatross", "002.Laysan_Albatross"]
    assert dataset.test.class_names == ["101.White_Pelican", "102.Western_Wood_Pewee"]
    assert dataset.train.labels == [0, 0, 1, 1]
    assert dataset.test.paths[0] == (
        base / "images" / "101.White_Pelican" / "White_Pelican_0000_101.jpg"
    )


def test_cub200_missing_index_file(tmp_path: Path):
    base = write_cub(tmp_path)
    (base / "image_class_labels.txt").unlink()
    with pytest.raises(DatasetError, match=r"image_class_labels.txt not found"):
        read_cub200(base)


def test_cub200_missing_image(tmp_path: Path):
    base = write_cub(tmp_path)
    next((base / "images").rglob("*.jpg")).unlink()
    with pytest.raises(DatasetError, match=r"1 of 8 images listed in the cub200 index files"):
        read_cub200(base)


def test_cub200_wrong_folder(tmp_path: Path):
    with pytest.raises(DatasetError, match=r"images.txt not found in .*point cub200: at"):
        read_cub200(tmp_path)


# Cars196 --------------------------------------------------------------------------------------

CARS_FIELDS = ["relative_im_path", "bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "test"]


def write_cars196(root: Path, rows: list[tuple[int, int]]) -> None:
    """cars_annos.mat as shipped: 1xN struct array `annotations`, 1x196 cell `class_names`."""
    annotations = np.zeros((1, len(rows)), dtype=[(f, "O") for f in CARS_FIELDS])
    for i, (class_id, test_flag) in enumerate(rows):
        relative = f"car_ims/{i + 1:06d}.jpg"
        write_image(root / relative)
        box = [np.array([[v]], dtype=np.uint16) for v in (1, 2, 7, 5)]
        class_value = np.array([[class_id]], dtype=np.uint8)
        test_value = np.array([[test_flag]], dtype=np.uint8)
        annotations[0, i] = (relative, *box, class_value, test_value)
    class_names = np.empty((1, 196), dtype=object)
    class_names[0, :] = [f"Make Model {i} 2012" for i in range(1, 197)]
    scipy.io.savemat(
        root / "cars_annos.mat", {"annotations": annotations, "class_names": class_names}
    )


def test_cars196_splits_by_class_98_ignoring_the_test_flag(tmp_path: Path):
    write_cars196(
        tmp_path, [(1, 0), (1, 1), (98, 1), (98, 0), (99, 0), (99, 1), (196, 1), (196, 0)]
    )

    dataset = read_cars196(tmp_path)

    assert dataset.train.class_names == ["Make Model 1 2012", "Make Model 98 2012"]
    assert dataset.test.class_names == ["Make Model 99 2012", "Make Model 196 2012"]
    assert dataset.train.paths == [tmp_path / "car_ims" / f"{i:06d}.jpg" for i in (1, 2, 3, 4)]
    assert dataset.train.labels == [0, 0, 1, 1]
    assert dataset.test.labels == [0, 0, 1, 1]


def test_cars196_rejects_another_mat_file(tmp_path: Path):
    scipy.io.savemat(tmp_path / "cars_annos.mat", {"something": np.zeros(3)})
    with pytest.raises(DatasetError, match="is not the Cars196 annotation file"):
        read_cars196(tmp_path)


def test_cars196_without_annotations(tmp_path: Path):
    with pytest.raises(DatasetError, match=r"cars_annos.mat not found"):
        read_cars196(tmp_path)


# Stanford Online Products ---------------------------------------------------------------------


def write_sop(root: Path) -> Path:
    base = root / "Stanford_Online_Products"
    lists = {
        "train": [(1, 1, "bicycle_final/111_0.JPG"), (1, 1, "bicycle_final/111_1.JPG"),
                  (2, 2, "chair_final/222_0.JPG"), (2, 2, "chair_final/222_1.JPG")],
        "test": [(11319, 1, "bicycle_final/999_0.JPG"), (11319, 1, "bicycle_final/999_1.JPG"),
                 (11320, 3, "mug_final/888_0.JPG"), (11320, 3, "mug_final/888_1.JPG")],
    }  # fmt: skip
    for part, rows in lists.items():
        lines = ["image_id class_id super_class_id path"]
        for image_id, (class_id, super_id, path) in enumerate(rows, start=1):
            write_image(base / path)
            lines.append(f"{image_id} {class_id} {super_id} {path}")
        (base / f"Ebay_{part}.txt").write_text("\n".join(lines) + "\n")
    return base


def test_sop_reads_both_lists_from_the_folder_or_its_parent(tmp_path: Path):
    base = write_sop(tmp_path)
    for root in (base, tmp_path):
        dataset = read_sop(root)
        assert dataset.train.class_names == ["1", "2"]
        assert dataset.test.class_names == ["11319", "11320"]
        assert dataset.train.paths[2] == base / "chair_final" / "222_0.JPG"
        assert dataset.test.labels == [0, 0, 1, 1]


def test_sop_wrong_header(tmp_path: Path):
    base = write_sop(tmp_path)
    text = (base / "Ebay_test.txt").read_text().replace("super_class_id ", "")
    (base / "Ebay_test.txt").write_text(text)
    with pytest.raises(DatasetError, match=r"must start with the header line"):
        read_sop(base)


def test_sop_missing_test_list(tmp_path: Path):
    base = write_sop(tmp_path)
    (base / "Ebay_test.txt").unlink()
    with pytest.raises(DatasetError, match=r"Ebay_test.txt not found"):
        read_sop(base)


# load_dataset ---------------------------------------------------------------------------------


def test_load_dataset_dispatches_on_the_kind(tmp_path: Path):
    write_image_folder(tmp_path / "icons" / "train", {"a": 2, "b": 2})
    write_image_folder(tmp_path / "icons" / "test", {"c": 2, "d": 3})
    write_cub(tmp_path / "cub")
    write_sop(tmp_path / "sop")
    write_cars196(tmp_path / "cars", [(1, 0), (1, 0), (2, 1), (2, 0), (99, 0), (99, 0), (100, 1)])
    for name in ("x", "y", "z", "w"):
        write_image(tmp_path / "m" / f"{name}.jpg")
    (tmp_path / "m" / "data.csv").write_text(
        "path,label,split\nx.jpg,p,train\ny.jpg,q,train\nz.jpg,r,test\nw.jpg,s,test\n"
    )

    icons = load_dataset(str(tmp_path / "icons"))
    assert (icons.name, icons.test.class_names, len(icons.test)) == ("icons", ["c", "d"], 5)
    assert load_dataset(f"imagefolder:{tmp_path / 'icons'}").train.class_names == ["a", "b"]
    assert load_dataset(f"cub200:{tmp_path / 'cub'}").name == "cub200"
    assert load_dataset(f"sop:{tmp_path / 'sop'}").name == "sop"
    assert len(load_dataset(f"cars196:{tmp_path / 'cars'}").test) == 3
    manifest = load_dataset(f"manifest:{tmp_path / 'm' / 'data.csv'}")
    assert (manifest.name, manifest.train.class_names) == ("data", ["p", "q"])


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("flickr:{root}", r"unknown dataset kind 'flickr'.*imagefolder:PATH, cub200:PATH"),
        ("{root}/missing", r"dataset folder .*missing does not exist"),
        ("imagefolder:{root}/only_train", r"only_train has no test/ folder"),
        ("cub200:", r"has no path after 'cub200:'"),
        (
            "{root}/one_class",
            r"the train split of one_class .* has 1 class; retrieval needs at least",
        ),
        ("manifest:{root}/m.csv", r"m.csv has no test rows; give it a split column with train"),
    ],
)
def test_load_dataset_errors(tmp_path: Path, spec: str, message: str):
    write_image_folder(tmp_path / "only_train" / "train", {"a": 2, "b": 2})
    write_image_folder(tmp_path / "one_class" / "train", {"a": 2})
    write_image_folder(tmp_path / "one_class" / "test", {"c": 2, "d": 2})
    write_image(tmp_path / "a.jpg")
    (tmp_path / "m.csv").write_text("path,label,split\na.jpg,x,train\n")
    with pytest.raises(DatasetError, match=message):
        load_dataset(spec.format(root=tmp_path))


def test_check_trainable_names_the_class_with_one_image():
    split = Split.from_named([(Path("a1"), "a"), (Path("a2"), "a"), (Path("b1"), "b")])
    with pytest.raises(DatasetError, match="class b has 1 image; metric learning needs at least 2"):
        check_trainable(split)
    check_trainable(Split.from_named([(Path(p), p[0]) for p in ("a1", "a2", "b1", "b2")]))


def test_check_trainable_needs_two_classes():
    with pytest.raises(DatasetError, match="has 1 class; metric learning needs at least 2"):
        check_trainable(Split.from_named([(Path("a1"), "a"), (Path("a2"), "a")]))
