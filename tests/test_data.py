"""Data preparation: safe extraction, validation of every kind of bad input, versions."""

from __future__ import annotations

import os
import shutil
import stat
import zipfile

import numpy as np
import pytest
from PIL import Image

from components.common.archive import safe_extract
from components.common.data import check_source, prepare, resolve
from components.common.errors import DataError
from components.common.images import decode_split
from tests.archives import CLASSES, SHAPE_CLASSES, SHAPES_PER_SPLIT, make_layout, write_image, zip_folder


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


def _copy_image(layout, source: str, target: str, label: str, split: str, class_id: int) -> None:
    shutil.copyfile(layout / source, layout / target)
    with (layout / "headgear.csv").open("a") as csv:
        csv.write(f"{class_id},{target},{label},{split}\n")


def test_the_same_bytes_in_two_splits_are_refused_naming_five_pairs_and_a_count(layout, tmp_path):
    for i in range(1, 8):  # seven training images saved again, under new names, in the test split
        _copy_image(layout, f"train/BERET/{i:03d}.jpg", f"test/BERET/copy{i}.jpg", "BERET", "test", 1)
    with pytest.raises(DataError, match="same image is in two splits") as refused:
        prepare(layout, tmp_path / "store")
    assert "train/BERET/001.jpg = test/BERET/copy1.jpg" in str(refused.value)
    assert str(refused.value).count(" = ") == 5 and "and 2 more" in str(refused.value)
    assert not (tmp_path / "store").exists()


def test_the_same_bytes_under_two_labels_are_refused(layout, tmp_path):
    _copy_image(layout, "train/BERET/001.jpg", "train/ZUCCHETTO/100.jpg", "ZUCCHETTO", "train", 2)
    with pytest.raises(DataError, match="same image has two labels: train/BERET/001.jpg = train/ZUCCHETTO/100.jpg"):
        prepare(layout, tmp_path / "store")


def test_the_same_bytes_twice_in_one_class_are_kept_and_reported(layout, tmp_path, capsys):
    _copy_image(layout, "train/BERET/001.jpg", "train/BERET/again.jpg", "BERET", "train", 1)
    data = prepare(layout, tmp_path / "store")
    assert data.manifest["duplicates"] == [["train/BERET/001.jpg", "train/BERET/again.jpg"]]
    assert data.manifest["counts"]["train"] == 25
    assert "note: 1 sets of identical images under different names, kept" in capsys.readouterr().out


def test_rows_listed_twice_are_dropped_with_a_note(tmp_path, capsys):
    folder = make_layout(tmp_path / "d", extra_rows=["1,train/BERET/001.jpg,BERET,train"] * 2)
    data = prepare(folder, tmp_path / "store")
    assert data.manifest["counts"]["train"] == 24 and data.manifest["duplicates"] == []
    assert data.manifest["notes"] == [
        "headgear.csv lists 2 rows twice, dropped: train/BERET/001.jpg, train/BERET/001.jpg"
    ]
    assert "note: headgear.csv lists 2 rows twice" in capsys.readouterr().out


def test_the_version_hash_is_unchanged_by_reading_each_file_once(layout, tmp_path):
    # The hash of every file is now taken while validating; versions made before stay valid.
    import hashlib

    data = prepare(layout, tmp_path / "store")
    digest = hashlib.sha256()
    for row in data.index.sort_values("filepaths").itertuples(index=False):
        digest.update(f"{row[1]}\0{row[2]}\0{row[3]}\0{row[0]}\0".encode())
        digest.update(hashlib.sha256((layout / row[1]).read_bytes()).digest())
    assert data.version == digest.hexdigest()[:16]


def test_a_file_name_that_is_not_utf8_is_skipped_and_listed(tmp_path):
    folder = make_layout(tmp_path / "d", csv_name=None)
    name = os.fsdecode(b"train/BERET/caf\xe9.jpg")  # a Latin-1 name, as old Windows tools write
    write_image(folder / name, seed=1)
    data = prepare(folder, tmp_path / "store")
    assert data.manifest["skipped"] == [
        {"path": "train/BERET/caf\ufffd.jpg", "reason": "its name is not valid UTF-8; rename it"}
    ]
    assert data.manifest["counts"]["train"] == 24


def test_a_csv_that_is_not_utf8_is_read_as_cp1252_with_a_note(tmp_path):
    folder = make_layout(tmp_path / "d")
    write_image(folder / "train" / "BERET" / "café.jpg", seed=7777)
    csv = folder / "headgear.csv"
    csv.write_bytes(csv.read_bytes() + "1,train/BERET/café.jpg,BERET,train\n".encode("cp1252"))
    data = prepare(folder, tmp_path / "store")
    assert "train/BERET/café.jpg" in set(data.index["filepaths"])
    assert data.manifest["notes"] == ["headgear.csv is not UTF-8; read it as cp1252"]


def test_a_csv_row_without_a_file_path_is_named(tmp_path):
    folder = make_layout(tmp_path / "d", extra_rows=["1,,BERET,train"])
    with pytest.raises(DataError, match=r"headgear.csv: row 44 .* has no 'filepaths'; fill it in or delete the row"):
        prepare(folder, tmp_path / "store")


def test_a_damaged_zip_member_is_named_and_the_archive_refused(layout, tmp_path):
    archive = zip_folder(layout, tmp_path / "headgear.zip")
    with zipfile.ZipFile(archive) as zf:
        info = zf.getinfo("train/BERET/002.jpg")
    raw = bytearray(archive.read_bytes())
    start = info.header_offset + 30 + len(info.filename) + len(info.extra)
    raw[start + 100 : start + 140] = bytes(40)  # the stored bytes change; the CRC recorded does not
    archive.write_bytes(raw)
    with pytest.raises(
        DataError, match=r"headgear.zip: the member train/BERET/002.jpg is damaged .*download the archive again"
    ):
        prepare(archive, tmp_path / "store")


def test_a_deflated_member_that_does_not_inflate_is_named(layout, tmp_path):
    archive = tmp_path / "headgear.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("headgear/train/BERET/notes.txt", "words " * 2000)
    with zipfile.ZipFile(archive) as zf:
        info = zf.getinfo("headgear/train/BERET/notes.txt")
    raw = bytearray(archive.read_bytes())
    start = info.header_offset + 30 + len(info.filename) + len(info.extra)
    raw[start : start + 8] = b"\xff" * 8  # not a deflate stream
    archive.write_bytes(raw)
    with pytest.raises(DataError, match="the member headgear/train/BERET/notes.txt is damaged"):
        prepare(archive, tmp_path / "store")


def test_an_archive_that_inflates_beyond_the_limits_is_refused_before_extracting(layout, tmp_path, monkeypatch):
    archive = zip_folder(layout, tmp_path / "bomb.zip")
    with zipfile.ZipFile(archive, "a", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("padding.bin", bytes(8_000_000))  # 8 MB of zeros: some 8 kB in the archive
    assert archive.stat().st_size < 200_000
    with pytest.raises(DataError, match=r"refusing to extract .*bomb.zip: it inflates to .* 100 times its size"):
        prepare(archive, tmp_path / "store")
    monkeypatch.setenv("HEADGEAR_MAX_RATIO", "1000")
    monkeypatch.setenv("HEADGEAR_MAX_EXTRACT_GB", "0.005")
    with pytest.raises(DataError, match=r"beyond the limits of 5.0 MB and 1000 times"):
        prepare(archive, tmp_path / "store")
    monkeypatch.setenv("HEADGEAR_MAX_EXTRACT_GB", "0.01")
    assert prepare(archive, tmp_path / "store").manifest["counts"]["train"] == 24
    monkeypatch.setenv("HEADGEAR_MAX_RATIO", "many")
    with pytest.raises(DataError, match="HEADGEAR_MAX_RATIO='many': expected a number above 0"):
        prepare(archive, tmp_path / "store2")


def test_headers_that_understate_the_size_do_not_get_past_the_limit(tmp_path):
    archive = tmp_path / "liar.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("zeros.bin", bytes(3_000_000))
    with zipfile.ZipFile(archive) as zf:
        info = zf.getinfo("zeros.bin")
    raw = bytearray(archive.read_bytes())
    central = raw.rindex(b"PK\x01\x02")  # the central directory's record of the one member
    raw[central + 24 : central + 28] = (1000).to_bytes(4, "little")  # claims 1000 bytes uncompressed
    raw[info.header_offset + 22 : info.header_offset + 26] = (1000).to_bytes(4, "little")
    archive.write_bytes(raw)
    with pytest.raises(DataError, match="liar.zip: the member zeros.bin is damaged"):
        safe_extract(archive, tmp_path / "out")
    assert (tmp_path / "out" / "zeros.bin").stat().st_size <= 1000


def test_an_empty_zip_is_named_as_given(tmp_path):
    archive = tmp_path / "empty.zip"
    zipfile.ZipFile(archive, "w").close()
    with pytest.raises(DataError, match=rf"{archive} is an empty zip archive"):
        prepare(archive, tmp_path / "store")
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("readme.txt", "no images")
    with pytest.raises(DataError, match=rf"^{archive} has neither a train/ folder"):
        prepare(archive, tmp_path / "store")


def test_check_source_tells_at_once_what_cannot_be_used(layout, tmp_path):
    zip_path = zip_folder(layout, tmp_path / "headgear.zip")
    for usable in (zip_path, layout, prepare(layout, tmp_path / "store").root):
        check_source(str(usable))
    check_source("kaggle", allow_kaggle=True)
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "empty").mkdir()
    refused = {
        "kaggle": "run the pipeline",
        str(tmp_path / "notes.txt"): "is a file but not a zip archive",
        str(tmp_path / "empty"): "has neither a train/ folder nor a CSV",
        str(tmp_path / "nothing"): "is not a file or folder here",
    }
    for source, message in refused.items():
        with pytest.raises(DataError, match=message):
            check_source(source)
