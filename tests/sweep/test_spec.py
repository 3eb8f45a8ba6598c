"""``flora_lightning.sweep.spec``: the shipped sweep files, entry resolution, and bad entries."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from flora_lightning.sweep import PARTITION_KINDS, load_spec

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs"


def write_spec(folder: Path, **entries) -> Path:
    """A sweep file in ``folder``: the offline quickstart with one method and partition,
    with ``entries`` replacing keys (None removes one)."""
    spec = {
        "base": str(CONFIGS / "quickstart.yaml"),
        "datasets": {"digits": None},
        "methods": {"FLoRA": None},
        "partitions": {"iid": {"kind": "iid"}},
        "seeds": [0],
    }
    spec.update(entries)
    spec = {k: v for k, v in spec.items() if v is not None}
    path = folder / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def test_offline_spec_resolves_every_axis():
    spec = load_spec(CONFIGS / "sweeps" / "offline.yaml")
    assert list(spec.methods) == ["FLoRA", "FedFFT", "FedLC", "FedVMLC", "FedAA"]
    assert list(spec.partitions) == ["iid", "dir0.1", "dir1.0", "pat16"]
    assert spec.seeds == [0, 1] and list(spec.datasets) == ["digits"]
    assert spec.base_args() == ["--config", str(CONFIGS / "quickstart.yaml")]
    assert spec.dataset_args("digits") == []
    # A method file contributes only its `model` section, with its measured lr.
    flag, model = spec.method_args("FedAA")
    assert flag == "--config"
    assert json.loads(model) == {
        "model": yaml.safe_load((CONFIGS / "quickstart_fedaa.yaml").read_text())["model"]
    }
    assert json.loads(model)["model"]["init_args"]["optimizer"]["lr"] == 1e-2
    assert spec.partition_args("dir0.1") == [
        "--config",
        str(CONFIGS / "partitions" / "dirichlet0.1.yaml"),
    ]
    assert spec.seed_args(1) == ["--trainer.seed", "1", "--data.partition.seed", "1"]
    assert spec.common_args() == [
        "--trainer.callbacks",
        json.dumps([{"class_path": "MemoryProfiler"}]),
        "--trainer.rounds",
        "5",
        "--trainer.progress",
        "false",
    ]


def test_overlay_files_hold_only_their_section():
    for path in (CONFIGS / "partitions").glob("*.yaml"):
        content = yaml.safe_load(path.read_text())
        assert list(content) == ["data"] and list(content["data"]) == ["partition"], path
        assert content["data"]["partition"]["kind"] in PARTITION_KINDS
        assert path.read_text().startswith("# "), f"{path} needs a usage comment"
    methods = {p.stem: yaml.safe_load(p.read_text()) for p in (CONFIGS / "methods").glob("*.yaml")}
    assert sorted(methods) == ["fedaa", "fedfft", "fedlc", "fedvmlc", "flora"]
    for stem, content in methods.items():
        # Only the class: its defaults are the paper's settings.
        assert content == {"model": {"class_path": content["model"]["class_path"]}}
        assert content["model"]["class_path"].lower() == f"flora_lightning.methods.{stem}"


def test_method_overlays_give_the_papers_settings():
    from flora_lightning.cli import stage_parser

    parser = stage_parser("fit")
    for stem in ("flora", "fedfft", "fedlc", "fedvmlc", "fedaa"):
        config = parser.parse_args(
            [
                "--config",
                str(CONFIGS / "datasets" / "cifar10.yaml"),
                "--config",
                str(CONFIGS / "methods" / f"{stem}.yaml"),
            ]
        )
        model = config.model.init_args
        assert model.name_or_path == "openai/clip-vit-base-patch32"
        assert (model.optimizer.lr, model.optimizer.betas) == (5e-5, (0.9, 0.98))
        assert (model.optimizer.eps, model.optimizer.weight_decay) == (1e-6, 0.2)
    assert (config.trainer.rounds, config.data.partition.num_clients) == (50, 10)


def test_paper_spec_names_the_papers_grid():
    spec = load_spec(CONFIGS / "sweeps" / "paper.yaml")
    assert len(spec.datasets) == 16 and "cifar100" in spec.datasets
    assert list(spec.methods) == ["FLoRA", "FedFFT", "FedLC", "FedVMLC", "FedAA"]
    assert list(spec.partitions) == ["iid", "dir0.1", "dir1.0", "pat16", "fewshot16"]
    assert all(spec.method_args(m)[0] == "--config" for m in spec.methods)


def test_method_entries_resolve(tmp_path):
    inline = {
        "class_path": "flora_lightning.methods.FedLC",
        "init_args": {"optimizer": {"lr": 0.1}},
    }
    spec = load_spec(
        write_spec(
            tmp_path,
            methods={
                "fedlc": None,  # the entry's own name, short form
                "head": "FedLC",  # a class name
                "adapter": "fedaa",  # a short name
                "path": "flora_lightning.methods.FedFFT",  # a class path (checked per cell)
                "tuned": inline,
                "paper": str(CONFIGS / "methods" / "fedvmlc.yaml"),
            },
        )
    )
    assert spec.method_args("fedlc") == ["--model", "FedLC"]
    assert spec.method_args("head") == ["--model", "FedLC"]
    assert spec.method_args("adapter") == ["--model", "FedAA"]
    assert spec.method_args("path") == ["--model", "flora_lightning.methods.FedFFT"]
    assert json.loads(spec.method_args("tuned")[1]) == {"model": inline}
    paper = json.loads(spec.method_args("paper")[1])["model"]
    assert paper["class_path"] == "flora_lightning.methods.FedVMLC"


def test_paths_are_relative_to_the_sweep_file(tmp_path):
    (tmp_path / "parts").mkdir()
    (tmp_path / "parts" / "p.yaml").write_text("data:\n  partition:\n    kind: iid\n")
    spec = load_spec(write_spec(tmp_path, partitions={"p": "parts/p.yaml"}))
    assert spec.partition_args("p") == ["--config", str(tmp_path / "parts" / "p.yaml")]


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        (
            {"methods": {"FedXYZ": None}},
            "methods.FedXYZ: unknown method 'FedXYZ'; use one of FLoRA",
        ),
        ({"methods": {"x": "missing.yaml"}}, "methods.x: file missing.yaml does not exist"),
        ({"datasets": {"cifar": "nope/cifar.yaml"}}, "datasets.cifar: file nope/cifar.yaml"),
        ({"base": "absent.yaml"}, "base: file absent.yaml does not exist"),
        (
            {"partitions": {"odd": {"kind": "zipf"}}},
            "partitions.odd.kind: unknown partition kind 'zipf'; use one of iid, dirichlet",
        ),
        (
            {"partitions": {"odd": {"kind": "iid", "betta": 1}}},
            "partitions.odd.betta: unknown data.partition field; use one of kind, num_clients",
        ),
        (
            {"partitions": {"odd": {"kind": "iid", "seed": 3}}},
            "partitions.odd.seed: data.partition.seed is set by `seeds`",
        ),
        ({"partitions": {"a/b": {"kind": "iid"}}}, "partitions.a/b: names become folder names"),
        ({"datasets": {"report": None}}, "datasets.report: names become folder names"),
        ({"seeds": [0, 0]}, "seeds: must be a non-empty list of distinct integers"),
        ({"seeds": []}, "seeds: must be a non-empty list"),
        ({"methods": {}}, "methods: must be a non-empty mapping"),
        (
            {"overrides": ["--trainer.default_root_dir", "x"]},
            "overrides: --trainer.default_root_dir is set per cell by the sweep; remove it",
        ),
        ({"callbacks": [3]}, "callbacks[0]: expected a class name or {class_path: ...}"),
    ],
)
def test_bad_entries_are_named(tmp_path, entries, message):
    path = write_spec(tmp_path, **entries)
    with pytest.raises(ValueError) as err:
        load_spec(path)
    assert str(err.value).startswith(f"{path}: ")
    assert message in str(err.value)


def test_method_file_without_model_section(tmp_path):
    path = write_spec(tmp_path, methods={"x": str(CONFIGS / "partitions" / "iid.yaml")})
    with pytest.raises(ValueError, match=r"methods\.x: .*iid\.yaml has no `model: \{class_path"):
        load_spec(path)


def test_partition_file_without_partition_section(tmp_path):
    path = write_spec(tmp_path, partitions={"x": str(CONFIGS / "methods" / "fedlc.yaml")})
    with pytest.raises(ValueError, match=r"partitions\.x: .*fedlc\.yaml has no `data: \{partition"):
        load_spec(path)


def test_unknown_and_missing_keys(tmp_path):
    path = write_spec(tmp_path, rounds=5)
    with pytest.raises(ValueError, match=r"unknown key\(s\) rounds; a sweep file holds base, "):
        load_spec(path)
    path = write_spec(tmp_path, methods=None)
    with pytest.raises(ValueError, match=r"missing key\(s\) methods"):
        load_spec(path)
    with pytest.raises(ValueError, match="sweep --config: .*nothing.yaml does not exist"):
        load_spec(tmp_path / "nothing.yaml")
