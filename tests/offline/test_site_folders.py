"""The data owners' folders written from the digits: disjoint, complete, labelled right."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq

from flora_lightning.offline.digits import CLASS_NAMES, digits_data_files
from flora_lightning.offline.site_folders import TEST_FOLDER, write_site_folders


def test_sites_are_disjoint_seeded_and_labelled(tmp_path, offline_assets):
    sites = write_site_folders(tmp_path / "a", 3, seed=0)
    assert [s.name for s in sites] == ["site_0", "site_1", "site_2"]
    train = pq.read_table(digits_data_files()["train"])
    labels = train["label"].to_pylist()
    images = [cell["bytes"] for cell in train["image"].to_pylist()]
    rows = []
    for site in sites:
        files = list(site.rglob("*.png"))
        for f in files:  # the file is the row's image, in its class's folder
            row = int(f.stem)
            assert f.parent.name == CLASS_NAMES[labels[row]]
            assert f.read_bytes() == images[row]
        rows.append({int(f.stem) for f in files})
    assert sum(len(r) for r in rows) == len(labels)  # every row once: disjoint and complete
    assert set().union(*rows) == set(range(len(labels)))
    sizes = sorted(len(r) for r in rows)
    assert sizes[-1] - sizes[0] <= 1
    # the shuffle is the seed's: numpy's permutation cut in 3
    expected = np.array_split(np.random.default_rng(0).permutation(len(labels)), 3)
    assert [set(e.tolist()) for e in expected] == rows
    test_rows = len(list((tmp_path / "a" / TEST_FOLDER).rglob("*.png")))
    assert test_rows == pq.read_metadata(digits_data_files()["test"]).num_rows


def test_max_per_site_and_another_seed(tmp_path, offline_assets):
    a = write_site_folders(tmp_path / "a", 2, seed=1, max_per_site=5, test_folder=False)
    b = write_site_folders(tmp_path / "b", 2, seed=2, max_per_site=5, test_folder=False)
    assert [len(list(s.rglob("*.png"))) for s in a] == [5, 5]
    assert not (tmp_path / "a" / TEST_FOLDER).exists()
    assert {p.name for p in a[0].rglob("*.png")} != {p.name for p in b[0].rglob("*.png")}
