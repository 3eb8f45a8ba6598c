"""One data owner's data from its own path: labels by class name, clear refusals, skipped images.

Expected labels are read independently of the code under test: from the digits' parquet split
(the written file names are the rows of that split) or from arrays the test writes itself.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from flora_lightning.data.local_source import (
    LocalSourceError,
    load_local_source,
    source_counts,
)
from flora_lightning.offline.digits import CLASS_NAMES, digits_data_files


def _png(value: int, size: int = 8) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((size, size), value, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def _folder(root: Path, files: dict[str, int]) -> Path:
    """``{"cat/a.png": 10}``: one PNG per entry (pixel value 10) under ``root``."""
    for name, value in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(_png(value))
    return root


@pytest.fixture(scope="module")
def site(tmp_path_factory, offline_assets) -> Path:
    from flora_lightning.offline.site_folders import write_site_folders

    root = tmp_path_factory.mktemp("sites")
    return write_site_folders(root, 2, seed=3, max_per_site=60, test_folder=False)[0]


def _digits_train_labels() -> np.ndarray:
    return np.asarray(pq.read_table(digits_data_files()["train"])["label"].to_pylist())


def test_labels_are_matched_by_class_name_not_folder_order(site):
    run_classes = CLASS_NAMES[::-1]  # the run lists the digits nine..zero
    source = load_local_source(str(site), run_classes, "img", "y", field="data-path")
    truth = _digits_train_labels()
    files = sorted(site.rglob("*.png"))
    expected = {int(f.stem): run_classes.index(CLASS_NAMES[truth[int(f.stem)]]) for f in files}
    assert source.num_samples == len(files) == 60
    assert source.rows.column_names == ["img", "y"]  # the run's column names
    assert source.rows.features["y"].names == run_classes
    # each row's image is the file of its row: compare the pixels with the digits' own image
    got = {}
    for row in source.rows:
        digits_row = int(Path(row["img"].filename).stem)
        got[digits_row] = row["y"]
    assert got == expected


def test_source_counts_are_the_class_counts(site):
    source = load_local_source(str(site), CLASS_NAMES)
    truth = _digits_train_labels()
    rows = [int(f.stem) for f in site.rglob("*.png")]
    expected = np.zeros(10, dtype=np.int64)
    for r in rows:
        expected[truth[r]] += 1
    num, counts = source_counts(source)
    assert num == len(rows)
    np.testing.assert_array_equal(counts, expected)


def test_unknown_labels_are_listed_with_the_path(tmp_path):
    root = _folder(tmp_path / "site", {"cat/a.png": 1, "dog/b.png": 2, "emu/c.png": 3})
    with pytest.raises(LocalSourceError) as err:
        load_local_source(str(root), ["cat"], field="data.partition.client_dirs[1]")
    message = str(err.value)
    assert f"data.partition.client_dirs[1]={str(root)!r}" in message
    assert "2 label(s) the run does not know: ['dog', 'emu']" in message
    assert "data.class_names" in message


def test_underscores_match_spaces_and_case_is_hinted(tmp_path):
    root = _folder(tmp_path / "site", {"golden_retriever/a.png": 1, "Cat/b.png": 2})
    source = load_local_source(str(root), ["cat", "golden retriever", "Cat"])
    assert sorted(source.labels().tolist()) == [1, 2]  # Cat -> 2, golden_retriever -> 1
    with pytest.raises(
        LocalSourceError, match=r"Case differs for 'Cat' \(data.class_names has 'cat'\)"
    ):
        load_local_source(str(root), ["cat", "golden retriever"])


def test_an_empty_folder_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(LocalSourceError, match=r"data-path='.*empty': the folder is empty"):
        load_local_source(str(tmp_path / "empty"), ["cat"])


def test_images_without_class_folders_are_refused(tmp_path):
    root = _folder(tmp_path / "flat", {"a.png": 1, "b.png": 2})
    with pytest.raises(
        LocalSourceError, match=r"files directly in the folder \(a.png, b.png\) have no class"
    ):
        load_local_source(str(root), ["cat"])


def test_a_missing_path_is_named(tmp_path):
    with pytest.raises(LocalSourceError, match=r"data-path='.*nowhere': no such directory"):
        load_local_source(str(tmp_path / "nowhere"), ["cat"])


def _parquet(path: Path, columns: dict) -> Path:
    pq.write_table(pa.table(columns), path)
    return path


def test_parquet_missing_columns_name_the_fields(tmp_path):
    images = [{"bytes": _png(1), "path": None}]
    path = _parquet(tmp_path / "a.parquet", {"picture": images, "label": ["cat"]})
    with pytest.raises(LocalSourceError) as err:
        load_local_source(str(path), ["cat"], image_column="image", label_column="label")
    message = str(err.value)
    assert "no column 'image'" in message
    assert "'picture'" in message
    assert "data.image_column='image'" in message and "data.label_column='label'" in message


def test_parquet_string_labels_are_matched_by_name(tmp_path):
    images = [{"bytes": _png(v), "path": None} for v in (1, 2, 3)]
    path = _parquet(tmp_path / "a.parquet", {"image": images, "label": ["dog", "cat", "dog"]})
    source = load_local_source(str(path), ["cat", "dog"])
    assert source.labels().tolist() == [1, 0, 1]


def test_integer_labels_without_names_index_the_run_classes(tmp_path):
    images = [{"bytes": _png(v), "path": None} for v in (1, 2)]
    good = _parquet(tmp_path / "a.parquet", {"image": images, "label": [1, 0]})
    assert load_local_source(str(good), ["cat", "dog"]).labels().tolist() == [1, 0]
    bad = _parquet(tmp_path / "b.parquet", {"image": images, "label": [1, 5]})
    with pytest.raises(LocalSourceError, match=r"labels \[5\] outside 0..1"):
        load_local_source(str(bad), ["cat", "dog"])


def test_a_hub_split_loads_the_offline_digits(offline_assets):
    source = load_local_source("hub:flora-offline/digits:test", CLASS_NAMES)
    truth = pq.read_table(digits_data_files()["test"])["label"].to_pylist()
    assert source.labels().tolist() == truth
    with pytest.raises(LocalSourceError, match=r"no split 'nope'; its splits are"):
        load_local_source("hub:flora-offline/digits:nope", CLASS_NAMES)


def test_unreadable_images_are_refused_by_default(tmp_path):
    files = {f"cat/{i}.png": i for i in range(8)} | {f"dog/{i}.png": i for i in range(8)}
    root = _folder(tmp_path / "site", files)
    (root / "dog" / "3.png").write_bytes(b"not a png")
    with pytest.raises(LocalSourceError) as err:
        load_local_source(str(root), ["cat", "dog"])
    message = str(err.value)
    assert "1 of 16 images cannot be read" in message and "3.png" in message
    assert "data.max_unreadable_fraction=0.0" in message


def test_unreadable_images_below_the_threshold_are_skipped_and_counted(tmp_path):
    files = {f"cat/{i}.png": i for i in range(8)} | {f"dog/{i}.png": i for i in range(8)}
    root = _folder(tmp_path / "site", files)
    (root / "dog" / "3.png").write_bytes(b"not a png")
    (root / "cat" / "0.png").write_bytes(_png(0)[:20])  # truncated
    with pytest.warns(UserWarning, match="2 unreadable skipped"):
        source = load_local_source(str(root), ["cat", "dog"], max_unreadable_fraction=0.125)
    assert source.num_read == 16 and source.num_samples == 14
    assert sorted(Path(u).name for u in source.unreadable) == ["0.png", "3.png"]
    assert source_counts(source)[1].tolist() == [7, 7]
    with pytest.raises(LocalSourceError, match="2 of 16 images cannot be read"):
        load_local_source(str(root), ["cat", "dog"], max_unreadable_fraction=0.1)


def test_a_column_that_holds_no_images_is_refused(tmp_path):
    path = _parquet(tmp_path / "a.parquet", {"image": [1.5, 2.5], "label": ["cat", "cat"]})
    with pytest.raises(LocalSourceError, match=r"image column 'image' holds .*not images"):
        load_local_source(str(path), ["cat"])


def test_a_site_with_one_class_keeps_its_label(tmp_path):
    # datasets' imagefolder drops the labels of files that share one folder: not here
    root = _folder(tmp_path / "site", {"dog/a.png": 1, "dog/b.png": 2})
    assert load_local_source(str(root), ["cat", "dog"]).labels().tolist() == [1, 1]


def test_a_bad_image_inside_parquet_is_named_by_row(tmp_path):
    images = [{"bytes": _png(1), "path": None}, {"bytes": b"broken", "path": None}]
    path = _parquet(tmp_path / "a.parquet", {"image": images, "label": ["cat", "cat"]})
    with pytest.warns(UserWarning, match=r"1 unreadable skipped \(row 1\)"):
        source = load_local_source(str(path), ["cat"], max_unreadable_fraction=0.5)
    assert source.unreadable == ("row 1",) and source.num_samples == 1


def test_an_unknown_hub_dataset_names_the_node_field():
    with pytest.raises(LocalSourceError, match=r"^data-path='hub:nobody/nothing': could not load"):
        load_local_source("hub:nobody/nothing", ["cat"])


def test_a_corrupt_parquet_file_names_the_node_field(tmp_path):
    (tmp_path / "a.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(
        LocalSourceError, match=r"^data-path='.*a.parquet': .*not a readable parquet"
    ):
        load_local_source(str(tmp_path / "a.parquet"), ["cat"])
