"""The node's policy over the run config: overrides parsed, classified, checked by name."""

from __future__ import annotations

import dataclasses
import logging
import re

import pytest

from flora_lightning.flower.node_policy import (
    CLASS_KEYS,
    Override,
    OverrideRefused,
    check_overrides,
    classify,
    node_clip_norm,
    node_run_config,
    parse_overrides,
)


def test_overrides_split_into_keys_and_values():
    items = parse_overrides(
        "--trainer.max_local_steps 2 --trainer.availability '{dropout: 1.0}' "
        "--model.init_args.rank=4 --trainer.callbacks+=X --data.class_names a b"
    )
    assert items == [
        Override("trainer.max_local_steps", ("2",)),
        Override("trainer.availability", ("{dropout: 1.0}",)),
        Override("model.init_args.rank", ("4",)),
        Override("trainer.callbacks", ("X",)),
        Override("data.class_names", ("a", "b")),
    ]
    with pytest.raises(OverrideRefused, match="'stray' is not a --key argument"):
        parse_overrides("stray --trainer.seed 1")


@pytest.mark.parametrize(
    ("override", "rule"),
    [
        ("--trainer.client_state_dir /tmp/x", "path"),
        ("--trainer.feature_cache_dir=/tmp/x", "path"),
        ("--data.dataset hub:someone/else", "path"),
        ("--data.test_dataset /etc", "path"),
        ("--data.data_dir /etc", "path"),
        ("--data.data_files /etc/shadow", "path"),
        ("--data.partition.client_dirs '[/a, /b]'", "path"),
        ("--config /tmp/other.yaml", "path"),
        ("--data.some_new_path /x", "path"),  # any *_path key
        ("--model.name_or_path evil/model", "model"),
        ("--model.init_args.name_or_path evil/model", "model"),
        ("--model.text.name_or_path evil/model", "model"),
        ("--privacy.clip_norm 100", "privacy"),
        ("--privacy.level none", "privacy"),
        ("--model FedFFT", "class"),
        ("--model.init_args.rank 4", "class"),
        ("--trainer.strategy FedProx", "class"),
        ("--trainer.strategy.init_args.mu 0.1", "class"),
        ("--trainer.callbacks+=os.system", "class"),
        ("--trainer.attack '{kind: scale}'", "class"),
        ("--trainer.availability '{class_path: x.Y}'", "class"),
        ("--trainer.max_local_steps '{class_path: x.Y}'", "class"),  # a class in any value
        ("--trainer '{rounds: 2}'", "group"),
        ("--privacy '{level: none}'", "group"),
        ("--data.partition '{kind: folders}'", "group"),
        ("--trainer.max_local_steps 2", None),
        ("--trainer.local_epochs 3", None),
        ("--trainer.seed 1", None),
        ("--data.partition.num_clients 2", None),
        ("--data.batch_size 8", None),
    ],
)
def test_each_override_gets_its_rule(override, rule):
    (item,) = parse_overrides(override)
    assert classify(item) == rule


def test_a_refused_override_names_itself_its_rule_and_the_node_config_key():
    overrides = (
        "--trainer.max_local_steps 2 --trainer.client_state_dir /tmp/x --privacy.clip_norm 9"
    )
    with pytest.raises(OverrideRefused) as err:
        check_overrides(overrides, {"config": "/site/flora.yaml"})
    message = str(err.value)
    assert "--trainer.client_state_dir /tmp/x  (rule path" in message
    assert "--privacy.clip_norm 9  (rule privacy" in message
    assert "max_local_steps" not in message  # a plain setting passes
    assert 'allow-overrides="trainer.client_state_dir,privacy.clip_norm"' in message
    # allowed by name, or by a group above it; init_args spellings are one key
    check_overrides(overrides, {"allow-overrides": "trainer.client_state_dir, privacy"})
    check_overrides(
        "--trainer.strategy.init_args.mu 0.1", {"allow-overrides": "trainer.strategy.mu"}
    )
    with pytest.raises(OverrideRefused, match="rule privacy"):
        check_overrides(overrides, {"allow-overrides": "trainer.client_state_dir privacy.level"})


@dataclasses.dataclass(frozen=True)
class Run:  # the two fields of FlowerRunConfig the policy reads
    config: str = "configs/quickstart.yaml"
    overrides: str = ""


def test_a_pinned_yaml_wins_and_an_unpinned_node_warns(caplog):
    run = Run("/anywhere/server.yaml", "--trainer.seed 3")
    with caplog.at_level(logging.WARNING):
        pinned = node_run_config(run, {"config": "/site/flora.yaml"})
    assert pinned == Run("/site/flora.yaml", "--trainer.seed 3")
    assert "the run config's config='/anywhere/server.yaml' is ignored" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert node_run_config(run, {"partition-id": 0}) is run  # as before, with a warning
    assert "applies its overrides unchecked" in caplog.text
    # an allowlist alone locks the node (the run config's YAML, checked overrides)
    with pytest.raises(OverrideRefused, match="rule model"):
        node_run_config(Run(overrides="--model.name_or_path x/y"), {"allow-overrides": "trainer"})
    assert node_run_config(Run(overrides="--trainer.seed 1"), {"allow-overrides": ""}).config == (
        "configs/quickstart.yaml"
    )


@pytest.mark.parametrize("value", [0, -1, "nan", "inf", "x", True])
def test_node_clip_norm_must_be_a_finite_positive_number(value):
    assert node_clip_norm({}) is None
    assert node_clip_norm({"clip-norm": "0.5"}) == 0.5
    with pytest.raises(ValueError, match="node_config clip-norm=.* must be a finite number > 0"):
        node_clip_norm({"clip-norm": value})


def test_rules_cover_the_parsers_paths_classes_and_privacy():
    """Drift guard: every ``flora fit`` argument that names a file, takes a class or sets
    privacy is protected, so a new such field cannot slip through as a plain setting."""
    from flora_lightning.stages import stage_parser

    dests = {a.dest for a in stage_parser("fit")._actions}
    # class-typed arguments have a ``.help`` companion (jsonargparse); client_ranks takes a list
    # of the RankTier dataclass (no class_path: nothing to import)
    class_typed = {d.removesuffix(".help") for d in dests if d.endswith(".help")}
    assert class_typed - {"trainer.client_ranks"} == set(CLASS_KEYS)
    for dest in sorted(dests - {"help", "config"}):
        rule = classify(Override(dest, ()))
        if re.search(r"(_dir|_dirs|_path|_file|_files|dataset)$", dest):
            assert rule == "path", dest
        elif dest.startswith("privacy."):
            assert rule == "privacy", dest
        elif dest.removesuffix(".help") in CLASS_KEYS:
            assert rule == "class", dest
