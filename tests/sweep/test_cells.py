"""``flora_lightning.sweep.cells``: grid expansion, shards, arguments and per-cell validation."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from flora_lightning.sweep import Cell, Shard, cell_args, expand_cells, load_spec, validate_cells

ROOT = Path(__file__).resolve().parents[2]
OFFLINE = ROOT / "configs" / "sweeps" / "offline.yaml"


@pytest.fixture(scope="module")
def offline():
    return load_spec(OFFLINE)


def test_offline_grid_has_40_sorted_cells(offline):
    cells = expand_cells(offline)
    assert len(cells) == 40 == len(set(cells))
    assert cells == sorted(cells)
    assert cells[0].id == "digits/dir0.1/FLoRA/seed0"
    assert cells[-1].id == "digits/pat16/FedVMLC/seed1"
    assert {c.method for c in cells} == set(offline.methods)
    assert {c.partition for c in cells} == set(offline.partitions)
    assert Cell("digits", "iid", "FedLC", 1).run_dir("out") == Path("out/digits/iid/FedLC/seed1")
    assert expand_cells(offline) == cells  # stable


@pytest.mark.parametrize("count", [1, 2, 3, 7, 40, 41])
def test_every_cell_is_in_exactly_one_shard(offline, count):
    cells = expand_cells(offline)
    shards = [Shard.parse(f"{i}/{count}").select(cells) for i in range(1, count + 1)]
    assert sorted(c for shard in shards for c in shard) == cells
    sizes = [len(s) for s in shards]
    assert max(sizes) - min(sizes) <= 1  # dealt round-robin
    assert shards[0][0] == cells[0]
    if count < len(cells):
        assert shards[0][1] == cells[count]  # cell k goes to shard k % n + 1


def test_shard_round_robin():
    assert Shard.parse("2/3").select(list(range(8))) == [1, 4, 7]
    assert Shard.parse(" 1 / 1 ").select([5, 6]) == [5, 6]
    assert str(Shard.parse("3/4")) == "3/4"


@pytest.mark.parametrize("text", ["3/2", "0/2", "2", "a/b", "1/0", "-1/2", "1/2/3", ""])
def test_bad_shards_are_rejected(text):
    with pytest.raises(ValueError) as err:
        Shard.parse(text)
    assert str(err.value).startswith(f"sweep --shard {text!r}: expected i/n with 1 <= i <= n")


def test_cell_args_layer_base_axes_seed_and_overrides(offline, tmp_path):
    from flora_lightning.cli import stage_parser

    cell = Cell("digits", "dir0.1", "FedAA", 1)
    args = cell_args(offline, cell, tmp_path)
    assert args[:2] == ["--config", str(ROOT / "configs" / "quickstart.yaml")]
    assert args[-2:] == ["--trainer.default_root_dir", str(tmp_path / "digits/dir0.1/FedAA/seed1")]
    config = stage_parser("fit").parse_args(args)
    assert config.model.class_path == "flora_lightning.methods.FedAA"
    assert config.model.init_args.optimizer.lr == 1e-2  # quickstart_fedaa.yaml's
    assert config.model.init_args.name_or_path == "flora-offline/tiny-clip"
    partition = config.data.partition
    # The overlay sets kind and beta; the base's other partition fields stay.
    assert (partition.kind, partition.beta, partition.num_clients) == ("dirichlet", 0.1, 5)
    assert partition.min_samples == 20
    assert (partition.seed, config.trainer.seed) == (1, 1)
    assert config.trainer.rounds == 5 and config.trainer.progress is False
    assert [c.class_path for c in config.trainer.callbacks] == [
        "flora_lightning.callbacks.MemoryProfiler"
    ]
    assert config.data.dataset == "flora-offline/digits"


def test_pathological_overlay_is_the_papers_few_shot(offline, tmp_path):
    from flora_lightning.cli import stage_parser

    args = cell_args(offline, Cell("digits", "pat16", "FLoRA", 0), tmp_path)
    partition = stage_parser("fit").parse_args(args).data.partition
    assert (partition.kind, partition.classes_per_client, partition.shots) == (
        "pathological",
        None,
        16,
    )


def test_validate_cells_returns_every_config(offline, tmp_path):
    cells = expand_cells(offline)
    configs = validate_cells(offline, cells, tmp_path)
    assert list(configs) == cells
    assert {configs[c].trainer.rounds for c in cells} == {5}
    assert not any(tmp_path.iterdir())  # nothing written


def test_invalid_cell_is_named_with_its_field(tmp_path):
    spec_file = tmp_path / "sweep.yaml"
    spec_file.write_text(
        yaml.safe_dump(
            {
                "base": str(ROOT / "configs" / "quickstart.yaml"),
                "datasets": {"digits": None},
                "methods": {"FLoRA": None, "FedLC": None},
                "partitions": {"ok": {"kind": "iid"}, "bad": {"kind": "dirichlet", "beta": -1}},
                "seeds": [0],
            }
        )
    )
    spec = load_spec(spec_file)
    with pytest.raises(ValueError) as err:
        validate_cells(spec, expand_cells(spec), tmp_path / "out")
    message = str(err.value)
    assert message.startswith(f"{spec_file}: 2 of 4 cells do not validate; nothing was run:")
    assert (
        "cell digits/bad/FLoRA/seed0 (datasets.digits, partitions.bad, methods.FLoRA, seed 0): "
        "data.partition.beta must be > 0 (got -1.0)"
    ) in message
    assert "cell digits/bad/FedLC/seed0" in message and "digits/ok/" not in message
    assert not (tmp_path / "out").exists()


def test_invalid_override_is_named(tmp_path):
    spec_file = tmp_path / "sweep.yaml"
    spec_file.write_text(
        yaml.safe_dump(
            {
                "base": str(ROOT / "configs" / "quickstart.yaml"),
                "overrides": ["--trainer.roundz", "3"],
                "datasets": {"digits": None},
                "methods": {"FLoRA": None},
                "partitions": {"iid": {"kind": "iid"}},
            }
        )
    )
    spec = load_spec(spec_file)
    with pytest.raises(ValueError, match=r"cell digits/iid/FLoRA/seed0 .*trainer.roundz"):
        validate_cells(spec, expand_cells(spec), tmp_path)
