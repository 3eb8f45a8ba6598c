"""FederatedDataModule: bad settings fail before training, with the field to change named."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from flora_lightning.data.datamodule import FederatedDataModule
from flora_lightning.data.partition import PartitionConfig
from flora_lightning.federation.loop import FederatedLoop
from flora_lightning.methods import LoraSettings

DIGITS_TRAIN, DIGITS_TEST = 1079, 269  # flora-offline/digits split sizes


def write_parquet(path, labels, label_feature=None) -> str:
    """A tiny image dataset whose label column is a plain int (no class names)."""
    import datasets
    from PIL import Image

    images = [Image.fromarray(np.full((8, 8), 20 * i, dtype=np.uint8)) for i in range(len(labels))]
    features = datasets.Features(
        {"image": datasets.Image(), "label": label_feature or datasets.Value("int64")}
    )
    datasets.Dataset.from_dict({"image": images, "label": labels}, features=features).to_parquet(
        str(path)
    )
    return str(path)


@pytest.fixture
def int_label_parquet(tmp_path) -> dict[str, str]:
    path = write_parquet(tmp_path / "tiny.parquet", [0, 1, 2, 0, 1, 2, 0, 1])
    return {"train": path, "test": path}


def parquet_module(data_files, **kwargs) -> FederatedDataModule:
    kwargs.setdefault("test_split", "test")
    return FederatedDataModule(
        dataset="parquet",
        data_files=data_files,
        image_column="image",
        partition=PartitionConfig(num_clients=2, min_samples=1),
        **kwargs,
    )


def test_digits_setup(make_datamodule):
    data = make_datamodule()
    data.setup()
    assert data.class_names[:3] == ["zero", "one", "two"] and len(data.class_names) == 10
    assert len(data.train_set) == DIGITS_TRAIN
    assert len(data.test_set) == DIGITS_TEST
    sizes = [data.num_samples(c) for c in range(3)]
    assert sum(sizes) == DIGITS_TRAIN and min(sizes) >= 20
    assert data.counts.shape == (3, 10)
    assert data.label_table().splitlines()[-1].split()[:2] == ["all", str(DIGITS_TRAIN)]


def test_test_split_null_holds_out_test_fraction(make_datamodule):
    data = make_datamodule(test_split=None, test_fraction=0.2)
    data.setup()
    held_out = int(np.ceil(0.2 * DIGITS_TRAIN))
    assert len(data.test_set) == held_out == 216
    assert len(data.train_set) == DIGITS_TRAIN - held_out
    assert sum(data.num_samples(c) for c in range(3)) == DIGITS_TRAIN - held_out
    again = make_datamodule(test_split=None, test_fraction=0.2)
    again.setup()
    assert again.test_set["label"] == data.test_set["label"]  # seeded by data.partition.seed
    half = make_datamodule(test_split=None, test_fraction=0.5)
    half.setup()
    assert len(half.test_set) == int(np.ceil(0.5 * DIGITS_TRAIN))


def id_parquet(path, ids) -> str:
    """Rows whose 4x4 image is filled with the row's id (< 256) and labelled id % 3."""
    import datasets
    from PIL import Image

    images = [Image.fromarray(np.full((4, 4), i, dtype=np.uint8)) for i in ids]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")})
    datasets.Dataset.from_dict(
        {"image": images, "label": [i % 3 for i in ids]}, features=features
    ).to_parquet(str(path))
    return str(path)


def row_ids(split) -> list[int]:
    return [int(np.asarray(image)[0, 0]) for image in split["image"]]


def test_pooled_is_the_default_released_protocol(tmp_path):
    # train rows 0..39, test rows 40..49: pooled in that order, then a seeded random
    # int(0.2 * 50) = 10 held out, as the released code (np.random.choice without replacement).
    files = {
        "train": id_parquet(tmp_path / "train.parquet", range(40)),
        "test": id_parquet(tmp_path / "test.parquet", range(40, 50)),
    }
    default = FederatedDataModule()
    assert default.test_split == "pooled" and default.pool_splits == ["train", "test"]
    data = parquet_module(files, class_names=["a", "b", "c"], test_split="pooled")
    data.setup()
    expected_test = np.sort(np.random.default_rng(42).choice(50, size=10, replace=False))
    assert row_ids(data.test_set) == expected_test.tolist()
    assert row_ids(data.train_set) == np.setdiff1d(np.arange(50), expected_test).tolist()
    assert sum(data.num_samples(c) for c in range(2)) == 40
    assert any(i >= 40 for i in row_ids(data.train_set))  # the test split is pooled too

    other = parquet_module(
        files, class_names=["a", "b", "c"], test_split="pooled", test_fraction=0.3
    )
    other.partition.seed = 7
    other.setup()
    assert len(other.test_set) == 15
    assert row_ids(other.test_set) != row_ids(data.test_set)[:15]


def test_pooled_digits_sizes(make_datamodule):
    data = make_datamodule(test_split="pooled")
    data.setup()
    pooled = DIGITS_TRAIN + DIGITS_TEST
    assert len(data.test_set) == int(0.2 * pooled) == 269
    assert len(data.train_set) == pooled - 269


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"pool_splits": ["train", "validation"]}, "data.pool_splits='validation' is not a split"),
        ({"pool_splits": []}, "data.pool_splits must name one or more distinct splits"),
        ({"pool_splits": ["train", "train"]}, "data.pool_splits must name one or more distinct"),
    ],
)
def test_pooled_errors_name_the_field(int_label_parquet, overrides, message):
    with pytest.raises(ValueError, match=message):
        parquet_module(
            int_label_parquet, class_names=["a", "b", "c"], test_split="pooled", **overrides
        ).setup()


def test_max_test_samples(make_datamodule):
    data = make_datamodule(max_test_samples=100)
    data.setup()
    assert len(data.test_set) == 100


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"image_column": "img"}, "data.image_column='img' is not a column"),
        ({"label_column": "target"}, "data.label_column='target' is not a column"),
        ({"test_split": "validation"}, "data.test_split='validation' is not a split"),
        ({"train_split": "training"}, "data.train_split='training' is not a split"),
        ({"num_clients": 5000}, "data.partition.num_clients=5000 but the training set has 1079"),
    ],
)
def test_setup_errors_name_the_field(make_datamodule, overrides, message):
    data = make_datamodule(**overrides)
    with pytest.raises(ValueError) as err:
        data.setup()
    assert message in str(err.value)


def test_column_error_lists_the_columns_and_the_flag(make_datamodule):
    with pytest.raises(ValueError) as err:
        make_datamodule(image_column="img").setup()
    assert "['image', 'label']" in str(err.value)
    assert "--data.image_column" in str(err.value)


def test_missing_test_split_suggests_holding_out(make_datamodule):
    with pytest.raises(ValueError, match="--data.test_split null"):
        make_datamodule(test_split="validation").setup()


def test_int_label_column_needs_class_names(int_label_parquet):
    with pytest.raises(ValueError) as err:
        parquet_module(int_label_parquet).setup()
    assert str(err.value).startswith("data.class_names is required")
    assert "'label'" in str(err.value)


def test_class_names_given_for_int_labels(int_label_parquet):
    data = parquet_module(int_label_parquet, class_names=["zero", "sea_lion", "two"])
    data.setup()
    assert data.class_names == ["zero", "sea lion", "two"]
    assert sum(data.num_samples(c) for c in range(2)) == 8


def test_labels_beyond_class_names_rejected(int_label_parquet):
    with pytest.raises(ValueError) as err:
        parquet_module(int_label_parquet, class_names=["zero", "one"]).setup()
    assert "data.label_column" in str(err.value)
    assert "[0, 2]" in str(err.value) and "data.class_names" in str(err.value)


def test_class_names_count_must_match_class_label(tmp_path):
    import datasets

    path = write_parquet(
        tmp_path / "named.parquet", [0, 1, 0, 1], datasets.ClassLabel(names=["cat", "dog"])
    )
    data = parquet_module({"train": path, "test": path}, class_names=["a", "b", "c"])
    with pytest.raises(ValueError, match="data.class_names has 3 names but .* has 2 classes"):
        data.setup()


@pytest.mark.parametrize(
    ("build", "field"),
    [
        (lambda: FederatedDataModule(template="a photo of a cat."), "data.template"),
        (lambda: FederatedDataModule(test_fraction=1.0), "data.test_fraction"),
        (lambda: FederatedDataModule(batch_size=0), "data.batch_size"),
        (lambda: FederatedDataModule(max_test_samples=0), "data.max_test_samples"),
        (lambda: PartitionConfig(beta=0.0), "data.partition.beta"),
        (lambda: PartitionConfig(num_clients=0), "data.partition.num_clients"),
        (lambda: LoraSettings(rank=0), "model.lora.rank"),
        (lambda: FederatedLoop(join_ratio=1.5), "trainer.join_ratio"),
        (lambda: FederatedLoop(join_ratio=0.0), "trainer.join_ratio"),
    ],
)
def test_construction_errors_name_the_field(build, field):
    with pytest.raises(ValueError) as err:
        build()
    assert str(err.value).startswith(field)


def test_bad_template_shows_an_example():
    with pytest.raises(ValueError, match=r"must contain '\{\}'.*e\.g\. 'a photo of a \{\}\.'"):
        FederatedDataModule(template="a photo of a cat.")


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"image_column": "img"}, "data.image_column"),
        ({"test_split": "validation"}, "data.test_split"),
        ({"num_clients": 5000}, "data.partition.num_clients"),
    ],
)
def test_data_errors_raise_before_training(
    make_flora, make_datamodule, make_loop, overrides, field
):
    loop = make_loop(rounds=1)
    with pytest.raises(ValueError, match=field):
        loop.fit(make_flora(), make_datamodule(**overrides))
    assert loop.history == []
    assert not loop.run_dir.exists()  # no summary, checkpoints or logs of a run that never began


def test_dataset_not_available_offline_fails_fast(monkeypatch):
    from flora_lightning.data.source import DatasetNotAvailableError

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(DatasetNotAvailableError) as err:
        FederatedDataModule(dataset="uoft-cs/cifar10").setup()
    assert time.perf_counter() - start < 30
    message = str(err.value)
    assert message.startswith("data.dataset")
    assert "uoft-cs/cifar10" in message
    assert "--data.dataset" in message
    assert "flora-offline/digits" in message


# ------------------------------------------------------------------ data.preprocess
def test_preprocess_value_is_checked_first():
    with pytest.raises(ValueError, match=r"^data\.preprocess must be device or processor"):
        FederatedDataModule(preprocess="gpu")


def per_image(model):
    """The device transform applied image by image in the loader (``processor`` mode): the
    same pixels as ``device`` mode's batches, but made on the CPU before the model sees them."""
    from flora_lightning.clip.preprocess import decode_image

    return lambda image: model.device_preprocess(decode_image(image)[None])[0]


def test_device_preprocess_collates_uint8_and_the_model_preprocesses(make_datamodule, make_flora):
    """``device``: the loader yields decoded uint8 images; the model turns them into the
    pixels the processor makes (within 2 uint8 levels: see tests/clip/test_preprocess.py)."""
    model = make_flora()
    device, processor = make_datamodule(), make_datamodule(preprocess="processor")
    assert device.preprocess == "device"  # the default
    for data in (device, processor):
        data.setup()
        data.set_image_transform(model.image_transform)
    rows = [device.test_set[i] for i in range(40)]
    images, labels = device.collate(rows)
    pixels, same_labels = processor.collate(rows)
    assert images.dtype == torch.uint8 and images.shape == (40, 3, 8, 8)  # digits: 8x8
    assert torch.equal(labels, same_labels)
    prepared = model.prepare_images(images)
    assert prepared.shape == pixels.shape == (40, 3, 32, 32)  # tiny CLIP: 32 px
    std = torch.tensor(model.device_preprocess.std).view(3, 1, 1)
    assert ((prepared - pixels).abs() * std * 255).max() <= 2 + 1e-3
    assert model.prepare_images(pixels) is pixels  # float pixels pass through
    # bit for bit what the same transform gives image by image
    assert torch.equal(prepared, torch.stack([per_image(model)(row["image"]) for row in rows]))


def test_device_preprocess_keeps_mixed_sizes_apart(make_flora):
    """Images of different sizes cannot stack as uint8: a list, preprocessed per size."""
    from PIL import Image

    rng = np.random.default_rng(0)
    sizes = [(8, 8), (12, 9), (8, 8), (20, 31)]
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes]
    data = FederatedDataModule(image_column="image", preprocess="device")
    batch, _ = data.collate([{"image": image, "label": 0} for image in images])
    assert [tuple(image.shape) for image in batch] == [(3, h, w) for h, w in sizes]
    model = make_flora()
    expected = torch.stack([per_image(model)(image) for image in images])
    assert torch.equal(model.prepare_images(batch), expected)


def test_device_preprocess_trains_and_evaluates_as_per_image(make_datamodule, make_flora):
    """Wiring: a client fit from pixels (uncached FLoRA, as FedFFT and FedVM-LC train) and the
    global evaluation see, with ``device``, exactly the pixels of the same transform run per
    image in the loader: the same update and the same accuracy, bit for bit."""
    import lightning as L

    from flora_lightning.federation.evaluation import evaluate
    from flora_lightning.federation.local_trainer import LocalTrainer

    results = []
    for preprocess in ("device", "processor"):
        data = make_datamodule(preprocess=preprocess)
        data.setup()
        model = make_flora()
        model.configure_task(data.class_names, data.template)
        data.set_image_transform(per_image(model))  # used by processor mode only
        fabric = L.Fabric(accelerator="cpu", devices=1)
        fabric.setup_module(model)
        update = LocalTrainer(fabric, seed=42, max_local_steps=2).fit(model, data, 1, 1)
        results.append((update, evaluate(fabric, model, data, len(data.class_names))))
    (device, device_eval), (processor, processor_eval) = results
    assert device.train_loss == processor.train_loss
    for name, tensor in device.state.items():
        assert torch.equal(tensor, processor.state[name])
    assert device_eval == processor_eval
    assert 0 < device_eval["test_acc"] <= 1
