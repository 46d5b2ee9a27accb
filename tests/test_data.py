"""Data preparation: safe extraction, validation of every kind of bad input, versions."""

from __future__ import annotations

import shutil
import stat
import zipfile

import numpy as np
import pytest
from PIL import Image

from components.data import DataError, decode_split, prepare, resolve
from tests.conftest import CLASSES, SHAPE_CLASSES, SHAPES_PER_SPLIT, make_layout, write_image, zip_folder


def test_a_zip_in_the_headgear_layout_becomes_a_content_addressed_version(layout, tmp_path):
    data = prepare(zip_folder(layout, tmp_path / "headgear.zip"), tmp_path / "store")
    assert data.classes == CLASSES
    assert data.manifest["counts"] == {"train": 24, "valid": 9, "test": 9}
    assert data.manifest["per_class"]["valid"] == dict.fromkeys(CLASSES, 3)
    assert data.root == tmp_path / "store" / data.version
    assert (data.root / "train" / "BERET" / "001.jpg").is_file()
    assert not (data.root / "EfficientNetB0-headgear.h5").exists()  # unrelated files stay behind

    # The same content, zipped under a top folder or read as a folder, is the same version.
    nested = prepare(zip_folder(layout, tmp_path / "nested.zip", prefix="headgear/"), tmp_path / "store")
    assert nested.version == data.version
    assert prepare(layout, tmp_path / "store").version == data.version
    assert prepare(data.root, tmp_path / "other-store").root == data.root  # a version is used as it is

    write_image(layout / "test" / "BERET" / "001.jpg", seed=99)  # one changed image: a new version
    assert prepare(layout, tmp_path / "store").version != data.version


def test_without_a_csv_the_folders_are_read(tmp_path):
    folder = make_layout(tmp_path / "d", csv_name=None)
    data = prepare(folder, tmp_path / "store")
    assert data.classes == CLASSES and data.manifest["counts"]["train"] == 24


def test_the_csv_is_found_under_its_other_names(tmp_path):
    for name in ("headgear.csv.csv", "anything.csv"):
        folder = make_layout(tmp_path / name, csv_name=name)
        (folder / "train" / "BERET" / "001.jpg").unlink()  # the CSV, not the folders, rules
        data = prepare(folder, tmp_path / "store", strict=False)
        assert data.manifest["skipped"] == [{"path": "train/BERET/001.jpg", "reason": "listed but missing"}]


def test_corrupt_and_truncated_images_are_skipped_and_listed_or_fail_with_strict(layout, tmp_path):
    (layout / "train" / "BERET" / "002.jpg").write_bytes(b"\xff\xd8 this is no jpeg")
    good = (layout / "train" / "BERET" / "003.jpg").read_bytes()
    (layout / "train" / "BERET" / "003.jpg").write_bytes(good[: len(good) // 2])
    data = prepare(layout, tmp_path / "store")
    skipped = {bad["path"]: bad["reason"] for bad in data.manifest["skipped"]}
    assert set(skipped) == {"train/BERET/002.jpg", "train/BERET/003.jpg"}
    assert all("does not decode" in reason for reason in skipped.values())
    assert data.manifest["counts"]["train"] == 22
    assert "train/BERET/002.jpg" not in set(data.index["filepaths"])

    with pytest.raises(DataError, match=r"bad file train/BERET/00[23]\.jpg.*drop --strict"):
        prepare(layout, tmp_path / "strict-store", strict=True)


def test_cmyk_grayscale_rgba_and_png_images_are_converted_to_rgb(layout, tmp_path):
    write_image(layout / "train" / "BERET" / "001.jpg", seed=1, mode="CMYK")
    write_image(layout / "train" / "BERET" / "002.jpg", seed=1, mode="L")
    write_image(layout / "train" / "BERET" / "003.jpg", seed=1, mode="RGBA", fmt="PNG")  # PNG under .jpg
    assert Image.open(layout / "train" / "BERET" / "001.jpg").mode == "CMYK"
    data = prepare(layout, tmp_path / "store", strict=True)
    images, labels = decode_split(data, "train", image_size=16)
    assert images.shape == (24, 16, 16, 3) and images.dtype == np.uint8
    assert sorted(set(labels)) == [0, 1, 2]


def test_a_csv_row_without_its_file_is_reported_by_path(tmp_path):
    folder = make_layout(tmp_path / "d", extra_rows=["1,train/BERET/404.jpg,BERET,train"])
    data = prepare(folder, tmp_path / "store")
    assert data.manifest["skipped"] == [{"path": "train/BERET/404.jpg", "reason": "listed but missing"}]
    with pytest.raises(DataError, match="train/BERET/404.jpg: listed but missing"):
        prepare(folder, tmp_path / "store2", strict=True)


def test_a_class_missing_from_one_split_is_an_error(layout, tmp_path):
    shutil.rmtree(layout / "valid" / "ZUCCHETTO")
    (layout / "headgear.csv").unlink()
    with pytest.raises(DataError, match=r"the valid split has no images of the classes \['ZUCCHETTO'\]"):
        prepare(layout, tmp_path / "store")


def test_an_empty_split_is_an_error(tmp_path):
    folder = make_layout(tmp_path / "d", per_split=(4, 2, 0), csv_name=None)
    with pytest.raises(DataError, match="the test split has no usable images"):
        prepare(folder, tmp_path / "store")


def test_class_ids_that_disagree_with_labels_are_an_error(tmp_path):
    folder = make_layout(tmp_path / "d")
    csv = folder / "headgear.csv"
    csv.write_text(csv.read_text().replace("0,train/BASEBALL CAP/001.jpg", "2,train/BASEBALL CAP/001.jpg"))
    with pytest.raises(DataError, match="class ids and labels disagree for: BASEBALL CAP"):
        prepare(folder, tmp_path / "store")


def test_a_csv_with_wrong_columns_is_an_error(tmp_path):
    folder = make_layout(tmp_path / "d")
    csv = folder / "headgear.csv"
    csv.write_text(csv.read_text().replace("data set", "subset"))
    with pytest.raises(DataError, match=r"lacks the columns \['data set'\]"):
        prepare(folder, tmp_path / "store")


@pytest.mark.parametrize("entry", ["../escape.txt", "/etc/evil.txt", "train/../../escape.txt"])
def test_a_zip_entry_outside_the_target_is_refused_and_nothing_is_written(layout, tmp_path, entry):
    archive = zip_folder(layout, tmp_path / "hostile.zip")
    with zipfile.ZipFile(archive, "a") as zf:
        zf.writestr(entry, "owned")
    with pytest.raises(DataError, match=rf"entries would land outside the target or are links: {entry}"):
        prepare(archive, tmp_path / "store")
    assert not (tmp_path / "escape.txt").exists()
    assert not (tmp_path / "store").exists()


def test_a_link_in_a_zip_is_refused(layout, tmp_path):
    archive = zip_folder(layout, tmp_path / "link.zip")
    with zipfile.ZipFile(archive, "a") as zf:
        info = zipfile.ZipInfo("train/BERET/link.jpg")
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(info, "/etc/passwd")
    with pytest.raises(DataError, match="train/BERET/link.jpg"):
        prepare(archive, tmp_path / "store")


def test_an_unknown_source_says_what_to_pass(tmp_path):
    with pytest.raises(DataError, match="pass a zip or a folder in the headgear layout"):
        resolve(str(tmp_path / "nothing-here"))
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(DataError, match="neither a zip archive nor a folder"):
        prepare(tmp_path / "notes.txt", tmp_path / "store")


def test_the_shapes_archive_prepares_with_every_image(shapes_zip, tmp_path):
    data = prepare(shapes_zip, tmp_path / "store", strict=True)
    assert data.manifest["counts"] == {split: n * len(SHAPE_CLASSES) for split, n in SHAPES_PER_SPLIT.items()}
    assert data.classes == list(SHAPE_CLASSES) and data.manifest["skipped"] == []


def test_the_fashion_archive_prepares_with_every_image(fashion_zip, tmp_path):
    data = prepare(fashion_zip, tmp_path / "store", strict=True)
    assert data.manifest["counts"] == {"train": 3600, "valid": 500, "test": 500}
    assert len(data.classes) == 10 and data.manifest["skipped"] == []
