"""Tests for federated partitioning of the training set."""

from argparse import ArgumentError
from pathlib import Path

import numpy as np
import pytest

from flora_lightning.data.label_table import label_counts
from flora_lightning.data.partition import PartitionConfig, partition_indices

ROOT = Path(__file__).resolve().parents[2]
NUM_CLASSES = 10
# 10 classes x 200 samples, sorted by class so that an unshuffled split would be non-IID.
LABELS = np.repeat(np.arange(NUM_CLASSES), 200)

CONFIGS = {
    "iid": PartitionConfig(kind="iid", num_clients=7),  # the released per-class split
    "iid-random-chunks": PartitionConfig(kind="iid", num_clients=7, iid_rule="random_chunks"),
    "dirichlet": PartitionConfig(kind="dirichlet", num_clients=10, beta=0.5),
    "pathological": PartitionConfig(kind="pathological", num_clients=5, classes_per_client=2),
    "pathological-overlap": PartitionConfig(
        kind="pathological", num_clients=10, classes_per_client=3
    ),
    "fewshot-disjoint": PartitionConfig(
        kind="fewshot", num_clients=10, shots=8, shots_overlap=False
    ),
}
# The released code's IID few-shot split: clients draw their shots independently (may overlap).
FEWSHOT_OVERLAP = PartitionConfig(kind="fewshot", num_clients=10, shots=8)


def split(config: PartitionConfig, labels: np.ndarray = LABELS) -> list[np.ndarray]:
    return partition_indices(labels, NUM_CLASSES, config)


def mean_tv_distance(parts: list[np.ndarray]) -> float:
    """Mean total-variation distance of client label distributions to the global one."""
    counts = label_counts(LABELS, parts, NUM_CLASSES)
    client_dist = counts / counts.sum(axis=1, keepdims=True)
    global_dist = np.bincount(LABELS, minlength=NUM_CLASSES) / LABELS.size
    return float(np.mean(0.5 * np.abs(client_dist - global_dist).sum(axis=1)))


def released_iid(labels: np.ndarray, num_clients: int) -> list[np.ndarray]:
    """The released code's IID split (separate_data, niid=False, balance), written out here.

    For each class: its indices in dataset order (no shuffle), the first num_clients - 1
    clients take int(n_c / num_clients) consecutive ones each, the last client the rest.
    """
    clients = [[] for _ in range(num_clients)]
    for c in range(int(labels.max()) + 1):
        rows = [i for i in range(len(labels)) if labels[i] == c]
        share = int(len(rows) / num_clients)
        start = 0
        for client in range(num_clients):
            stop = start + share if client < num_clients - 1 else len(rows)
            clients[client] += rows[start:stop]
            start = stop
    return [np.array(sorted(rows), dtype=np.int64) for rows in clients]


@pytest.mark.parametrize(("num_clients", "seed"), [(7, 42), (10, 0), (3, 5)])
def test_iid_default_is_the_released_per_class_split(num_clients, seed):
    config = PartitionConfig(kind="iid", num_clients=num_clients, seed=seed)
    assert config.iid_rule == "per_class"
    # Shuffled labels with uneven class sizes: class remainders differ, rows interleave.
    labels = np.random.default_rng(seed).integers(0, NUM_CLASSES, size=1999)
    expected = released_iid(labels, num_clients)
    got = split(config, labels)
    assert all(np.array_equal(a, b) for a, b in zip(got, expected, strict=True))
    random_chunks = split(PartitionConfig(**{**vars(config), "iid_rule": "random_chunks"}), labels)
    assert not all(np.array_equal(a, b) for a, b in zip(random_chunks, expected, strict=True))


def test_iid_per_class_equal_shares_in_row_order_remainder_to_last():
    parts = split(CONFIGS["iid"])
    counts = label_counts(LABELS, parts, NUM_CLASSES)
    # 200 samples a class over 7 clients: int(200 / 7) = 28 each, the last 200 - 6 * 28 = 32.
    assert counts[:-1].tolist() == [[28] * NUM_CLASSES] * 6
    assert counts[-1].tolist() == [32] * NUM_CLASSES
    # consecutive rows of each class, in the order given: client 0 holds rows 0..27 of class 0
    assert parts[0][:28].tolist() == list(range(28))
    assert parts[6][-32:].tolist() == list(range(1968, 2000))
    np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(LABELS.size))


def test_iid_per_class_draws_nothing_so_the_seed_does_not_change_it():
    # The released split is deterministic; in the datamodule the seed still picks the
    # held-out test rows (data.test_split=pooled).
    first = split(CONFIGS["iid"])
    other = split(PartitionConfig(**{**vars(CONFIGS["iid"]), "seed": 43}))
    assert all(np.array_equal(a, b) for a, b in zip(first, other, strict=True))


def test_iid_random_chunks_equal_sizes_and_covers_every_index_once():
    parts = split(CONFIGS["iid-random-chunks"])
    sizes = [p.size for p in parts]
    assert len(parts) == 7
    assert max(sizes) - min(sizes) <= 1
    np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(LABELS.size))
    for p in parts:
        assert p.dtype == np.int64
        assert np.all(np.diff(p) > 0)


def test_iid_random_chunks_is_shuffled_before_splitting():
    counts = label_counts(LABELS, split(CONFIGS["iid-random-chunks"]), NUM_CLASSES)
    # Each client holds ~2000/7/10 = 28.6 samples of every class, not a contiguous run, and
    # not exactly 28 (the per-class rule's share).
    assert counts.min() >= 10
    assert counts.max() <= 50
    assert not np.all(counts[:-1] == 28)


def test_dirichlet_skew_grows_as_beta_falls():
    skew = {
        beta: np.mean(
            [
                mean_tv_distance(split(PartitionConfig(kind="dirichlet", beta=beta, seed=s)))
                for s in range(3)
            ]
        )
        for beta in (0.1, 1.0, 100.0)
    }
    assert skew[0.1] > skew[1.0] > skew[100.0]
    assert skew[0.1] > 0.5
    assert skew[100.0] < 0.1


def test_dirichlet_redraws_until_min_samples_met():
    def smallest(min_samples: int) -> int:
        config = PartitionConfig(kind="dirichlet", beta=0.3, min_samples=min_samples)
        return min(p.size for p in split(config))

    assert smallest(1) < 60  # the first draw (seed 42) has a small client ...
    assert smallest(60) >= 60  # ... so flwr redraws until every client has 60


def test_pathological_disjoint_classes_when_they_fit():
    parts = split(CONFIGS["pathological"])
    counts = label_counts(LABELS, parts, NUM_CLASSES)
    present = counts > 0
    assert present.sum(axis=1).tolist() == [2] * 5
    assert present.sum(axis=0).tolist() == [1] * NUM_CLASSES  # every class on one client
    assert counts.sum(axis=1).tolist() == [400] * 5  # all samples of its classes


def test_pathological_exact_classes_when_overlapping():
    counts = label_counts(LABELS, split(CONFIGS["pathological-overlap"]), NUM_CLASSES)
    assert (counts > 0).sum(axis=1).tolist() == [3] * 10
    assert np.all(counts.sum(axis=0) == 200)  # first-deterministic: every class used


def test_pathological_shots_caps_samples_per_class():
    config = PartitionConfig(kind="pathological", num_clients=5, shots=15)
    counts = label_counts(LABELS, split(config), NUM_CLASSES)
    assert sorted(set(counts.ravel().tolist())) == [0, 15]
    assert counts.sum(axis=1).tolist() == [30] * 5


@pytest.mark.parametrize("config", [CONFIGS["fewshot-disjoint"], FEWSHOT_OVERLAP])
def test_fewshot_exact_shots_per_class(config):
    parts = split(config)
    counts = label_counts(LABELS, parts, NUM_CLASSES)
    assert counts.shape == (10, NUM_CLASSES)
    assert np.all(counts == 8)
    assert all(np.unique(p).size == p.size for p in parts)  # no sample twice within a client


def test_fewshot_overlap_is_the_default_and_draws_each_client_independently():
    assert PartitionConfig(kind="fewshot", shots=1).shots_overlap is True
    parts = split(FEWSHOT_OVERLAP)
    everything = np.concatenate(parts)
    # 10 clients x 80 draws from 2,000 rows: independent draws share rows (about 15 here),
    # the disjoint deal never does.
    assert np.unique(everything).size < everything.size
    disjoint = np.concatenate(split(CONFIGS["fewshot-disjoint"]))
    assert np.unique(disjoint).size == disjoint.size


def test_fewshot_overlap_needs_only_shots_per_class():
    # 8 samples per class suffice for any number of clients when shots may overlap ...
    labels = np.repeat(np.arange(NUM_CLASSES), 8)
    parts = split(FEWSHOT_OVERLAP, labels)
    assert all(np.array_equal(p, np.arange(labels.size)) for p in parts)
    # ... while the disjoint deal needs num_clients x shots of each class.
    with pytest.raises(ValueError, match=r"needs 80 samples of every class but class 0 has 8"):
        split(CONFIGS["fewshot-disjoint"], labels)


def test_pathological_fewshot_default_deals_c_div_n_classes_remainder_to_last():
    # The released split: shuffled classes, C // N per client, the C mod N left over to the
    # last client, n shots of each.
    config = PartitionConfig(kind="pathological", num_clients=3, shots=16)
    assert config.classes_per_client is None
    counts = label_counts(LABELS, split(config), NUM_CLASSES)
    assert (counts > 0).sum(axis=1).tolist() == [3, 3, 4]
    assert (counts > 0).sum(axis=0).tolist() == [1] * NUM_CLASSES  # disjoint, all used
    assert sorted(set(counts.ravel().tolist())) == [0, 16]
    # the classes are shuffled, not dealt in label order
    assert not np.array_equal(np.flatnonzero(counts[0]), np.arange(3))


def test_pathological_too_few_shots_or_classes_is_an_error():
    with pytest.raises(ValueError, match=r"data\.partition\.shots=300 .* class \d+ has only 200"):
        split(PartitionConfig(kind="pathological", num_clients=5, shots=300))
    with pytest.raises(ValueError, match=r"10 classes < data\.partition\.num_clients=11"):
        split(PartitionConfig(kind="pathological", num_clients=11))


def released_dirichlet(labels: np.ndarray, num_clients: int, beta: float, seed: int):
    """The released code's Dirichlet split, written out here independently.

    For each class: proportions ~ Dir(beta), a client already holding >= N / num_clients
    samples gets proportion 0, normalise, cut the class at the cumulative proportions.
    The random stream is the one flwr-datasets uses (one generator, one draw per class in
    sorted class order), applied to the rows as partition_indices shuffles them.
    """
    order = np.random.default_rng(seed).permutation(labels.size)
    key = labels[order]
    rng = np.random.default_rng(seed)
    batches = [[] for _ in range(num_clients)]
    for c in np.unique(key):
        rows = np.flatnonzero(key == c)
        p = rng.dirichlet(np.repeat(beta, num_clients))
        p = np.array(
            [q * (len(b) < key.size / num_clients) for q, b in zip(p, batches, strict=True)]
        )
        p = p / p.sum()
        cuts = (np.cumsum(p) * rows.size).astype(int)[:-1]
        for b, part in zip(batches, np.split(rows, cuts), strict=True):
            b.extend(part.tolist())
    return [np.sort(order[np.asarray(b, dtype=np.int64)]) for b in batches]


@pytest.mark.parametrize(("beta", "seed"), [(0.1, 42), (0.1, 7), (1.0, 42), (0.5, 3)])
def test_dirichlet_default_is_the_released_self_balancing_split(beta, seed):
    config = PartitionConfig(kind="dirichlet", num_clients=10, beta=beta, seed=seed)
    assert config.self_balancing and config.min_samples == 1
    # 1,999 samples: n / num_clients is not a whole number, so flwr's "more than" and the
    # released "at least" stop rule cannot differ.
    labels = LABELS[:-1]
    expected = released_dirichlet(labels, 10, beta, seed)
    got = split(config, labels)
    assert all(np.array_equal(a, b) for a, b in zip(got, expected, strict=True))
    unbalanced = split(PartitionConfig(**{**vars(config), "self_balancing": False}), labels)
    assert not all(np.array_equal(a, b) for a, b in zip(unbalanced, expected, strict=True))


@pytest.mark.parametrize("name", CONFIGS)
def test_partitions_are_disjoint(name):  # every kind but the overlapping few-shot draw
    parts = split(CONFIGS[name])
    assert len(parts) == CONFIGS[name].num_clients
    everything = np.concatenate(parts)
    assert np.unique(everything).size == everything.size
    assert everything.min() >= 0 and everything.max() < LABELS.size


@pytest.mark.parametrize("name", [*(n for n in CONFIGS if n != "iid"), "fewshot-overlap"])
def test_same_seed_same_partition_other_seed_differs(name):
    config = CONFIGS.get(name, FEWSHOT_OVERLAP)
    first, again = split(config), split(config)
    other = split(PartitionConfig(**{**vars(config), "seed": config.seed + 1}))
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other, strict=True))


def test_label_counts_sums():
    parts = split(CONFIGS["dirichlet"])
    counts = label_counts(LABELS, parts, NUM_CLASSES)
    assert counts.shape == (10, NUM_CLASSES)
    assert counts.sum(axis=1).tolist() == [p.size for p in parts]
    np.testing.assert_array_equal(counts.sum(axis=0), np.bincount(LABELS))
    np.testing.assert_array_equal(counts[3], np.bincount(LABELS[parts[3]], minlength=10))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"kind": "shards"}, r"data\.partition\.kind"),
        (
            {"iid_rule": "stratified"},
            r"data\.partition\.iid_rule must be one of per_class, random_chunks "
            r"\(got 'stratified'\)",
        ),
        ({"num_clients": 0}, r"data\.partition\.num_clients must be >= 1"),
        (
            {"beta": 0.0},
            r"data\.partition\.beta must be > 0 \(got 0\.0\); use e\.g\. 0\.1",
        ),
        ({"classes_per_client": 0}, r"data\.partition\.classes_per_client"),
        ({"shots": 0}, r"data\.partition\.shots must be >= 1"),
        ({"kind": "fewshot"}, r"data\.partition\.shots is required"),
        ({"min_samples": 0}, r"data\.partition\.min_samples"),
    ],
)
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PartitionConfig(**kwargs)


def test_error_more_clients_than_samples():
    with pytest.raises(ValueError, match=r"data\.partition\.num_clients=50 .* has 30 samples"):
        partition_indices(np.zeros(30, dtype=int), 2, PartitionConfig(num_clients=50))


def test_error_labels_out_of_range():
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        partition_indices([0, 1, 3, 2], 3, PartitionConfig(num_clients=2, min_samples=1))


def test_error_pathological_more_classes_than_exist():
    config = PartitionConfig(kind="pathological", classes_per_client=11)
    with pytest.raises(ValueError, match=r"data\.partition\.classes_per_client=11 .* only 10"):
        split(config)


def test_error_fewshot_class_too_small():
    labels = LABELS[LABELS != 3].tolist() + [3] * 50
    config = PartitionConfig(kind="fewshot", num_clients=10, shots=8, shots_overlap=False)
    with pytest.raises(
        ValueError,
        match=r"needs 80 samples .* class 3 has 50; lower data\.partition\.shots",
    ):
        split(config, np.array(labels))
    overlapping = PartitionConfig(kind="fewshot", num_clients=10, shots=60)
    with pytest.raises(ValueError, match=r"shots=60 needs 60 samples .* class 3 has 50"):
        split(overlapping, np.array(labels))


def test_error_client_below_min_samples():
    config = PartitionConfig(num_clients=10, min_samples=5, iid_rule="random_chunks")
    with pytest.raises(
        ValueError,
        match=r"client \d+ received 3 samples, .*data\.partition\.min_samples=5",
    ):
        split(config, np.arange(30) % NUM_CLASSES)
    # Per class, 3 samples over 10 clients: int(3 / 10) = 0 each, all to the last client.
    with pytest.raises(
        ValueError,
        match=r"client 0 received 0 samples, fewer than data\.partition\.min_samples=1; "
        r"set data\.partition\.iid_rule=random_chunks",
    ):
        split(PartitionConfig(num_clients=10), np.arange(30) % NUM_CLASSES)


def test_error_dirichlet_min_samples_unreachable():
    config = PartitionConfig(kind="dirichlet", num_clients=10, beta=0.01, min_samples=150)
    with pytest.raises(
        ValueError, match=r"raise data\.partition\.beta.*data\.partition\.min_samples"
    ):
        split(config)


def test_pathological_default_with_fewer_present_classes_than_clients():
    # 10 declared classes but only 3 present: C // N would be 0; each client gets one class.
    labels = np.repeat([0, 1, 2], 50)
    counts = label_counts(
        labels, split(PartitionConfig(kind="pathological", num_clients=5), labels), NUM_CLASSES
    )
    assert (counts > 0).sum(axis=1).tolist() == [1] * 5


def test_cli_reads_the_iid_rule_and_names_the_field_of_a_bad_one():
    # Both runtimes parse data.partition with this parser (the Flower apps through
    # flower.app_config.build_components), so both get the same partitions.
    from flora_lightning.stages import stage_parser

    parser = stage_parser("fit")
    base = ["--config", str(ROOT / "configs" / "quickstart.yaml")]
    overlay = ["--config", str(ROOT / "configs" / "partitions" / "iid.yaml")]
    partition = parser.parse_args(base + overlay).data.partition
    assert (partition.kind, partition.iid_rule) == ("iid", "per_class")
    chosen = parser.parse_args(base + ["--data.partition.iid_rule", "random_chunks"])
    assert chosen.data.partition.iid_rule == "random_chunks"
    with pytest.raises(ArgumentError, match=r"data\.partition\.iid_rule"):
        parser.parse_args(base + ["--data.partition.iid_rule", "stratified"])
