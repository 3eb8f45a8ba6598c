"""The benchmarked workload: random-init CLIPs with real shapes, synthetic CIFAR-shaped data."""

from __future__ import annotations

import io
import re
from collections.abc import Sequence
from pathlib import Path

from flora_lightning.bench.config import CIFAR10_CLASSES, TEMPLATE


def build_clip_parts(arch: str, words: Sequence[str] = ()):
    """A random-init CLIP with ``arch`` shapes, the offline tokenizer and CLIP's image processor.

    ViT-B/32 keeps CLIP's 49,408-token embedding table (so every parameter count is the real
    model's: 151,277,313) and takes BOS/EOS/pad ids from the byte-level tokenizer, whose ids
    all fall inside it. ``words`` become single tokens (BPE merges), as in CLIP's own
    vocabulary, so captions have the real model's length ("a photo of a airplane." = 8 tokens).
    """
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    from flora_lightning.offline.tiny_clip import build_config, build_tokenizer

    # The tiny arch mirrors flora-offline/tiny-clip exactly (514-token vocabulary, no merges).
    tokenizer = build_tokenizer(words if arch != "tiny" else ())
    if arch == "tiny":
        config = build_config(tokenizer)
    else:
        config = CLIPConfig()
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            setattr(config.text_config, key, getattr(tokenizer, key))
    size = config.vision_config.image_size
    processor = CLIPImageProcessor(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size}
    )
    return CLIPModel(config).eval(), tokenizer, processor


def build_clip_bundle(arch: str, words: Sequence[str] = ()):
    """:func:`build_clip_parts` as the :class:`~flora_lightning.clip.backbone.CLIPBundle` the
    methods attach (the image processor becomes CLIP's preprocessing transform)."""
    from flora_lightning.clip.backbone import CLIPBundle, build_image_transform
    from flora_lightning.clip.preprocess import DevicePreprocess

    model, tokenizer, processor = build_clip_parts(arch, words)
    return CLIPBundle(
        model,
        tokenizer,
        build_image_transform(processor),
        DevicePreprocess.from_processor(processor),
    )


def save_clip(arch: str, folder: str | Path, words: Sequence[str] = ()) -> str:
    """:func:`build_clip_parts` saved with ``save_pretrained``, so a flora YAML can name the
    folder as ``model.name_or_path`` (every process, a Flower node too, loads the same
    random weights); returns the folder."""
    from transformers import CLIPProcessor

    model, tokenizer, processor = build_clip_parts(arch, words)
    model.save_pretrained(folder)
    CLIPProcessor(image_processor=processor, tokenizer=tokenizer).save_pretrained(folder)
    return str(folder)


def build_method(variant: str, arch: str, num_classes: int):
    """The method's module on a fresh random-init CLIP, its task set (CIFAR-10 captions)."""
    from flora_lightning.methods import METHODS
    from flora_lightning.methods.base import build_model_from_bundle

    by_name = {cls.__name__: cls for cls in METHODS.values()}
    module = by_name[variant.removesuffix("-uncached")](name_or_path=f"random-init/{arch}")
    bundle = build_clip_bundle(arch, caption_words(num_classes))
    module = build_model_from_bundle(module, bundle)
    module.configure_task(class_names(num_classes), TEMPLATE)
    return module


def caption_words(num_classes: int) -> list[str]:
    """The words of every class caption (the tokenizer merges each into one token)."""
    captions = " ".join(TEMPLATE.format(name) for name in class_names(num_classes))
    return re.findall(r"[a-z]+", captions.lower())


def class_names(num_classes: int) -> list[str]:
    """CIFAR-10's names, then ``class 10``, ``class 11``, ... beyond ten."""
    return [CIFAR10_CLASSES[i] if i < 10 else f"class {i}" for i in range(num_classes)]


def synthetic_images(n: int, size: int, seed: int):
    """``n`` random uint8 RGB images ``[n, 3, size, size]`` (pixel values do not change cost)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=generator)


def preprocess(transform, images):
    import torch

    return torch.stack([transform(image) for image in images]).as_subclass(torch.Tensor)


def synthetic_datamodule(
    folder: str | Path,
    clients: int = 2,
    per_client: int = 16,
    test_samples: int = 16,
    batch_size: int = 8,
    num_classes: int = 10,
    input_size: int = 32,
    seed: int = 0,
):
    """A :class:`FederatedDataModule` on random ``input_size`` RGB images written as parquet.

    Labels cycle through the classes (CIFAR-10 names first); the training split is spread over
    ``clients`` in equal random chunks (``iid_rule=random_chunks``). Used for the loop-overhead
    run and for tests.
    """
    import datasets
    from PIL import Image

    from flora_lightning.data.datamodule import FederatedDataModule
    from flora_lightning.data.partition import PartitionConfig

    features = datasets.Features(
        {"img": datasets.Image(), "label": datasets.ClassLabel(names=class_names(num_classes))}
    )
    files = {}
    Path(folder).mkdir(parents=True, exist_ok=True)
    for split, n, offset in (("train", clients * per_client, 0), ("test", test_samples, 1)):
        rows = {"img": [], "label": []}
        for i, image in enumerate(synthetic_images(n, input_size, seed + offset)):
            buffer = io.BytesIO()
            Image.fromarray(image.permute(1, 2, 0).numpy()).save(buffer, format="PNG")
            rows["img"].append({"bytes": buffer.getvalue(), "path": None})
            rows["label"].append(i % num_classes)
        files[split] = str(Path(folder) / f"{split}.parquet")
        datasets.Dataset.from_dict(rows, features=features).to_parquet(files[split])
    return FederatedDataModule(
        dataset="parquet",
        data_files=files,
        image_column="img",
        template=TEMPLATE,
        batch_size=batch_size,
        eval_batch_size=max(test_samples, 1),
        # equal random shares: the released per-class rule gives a class with fewer rows than
        # clients wholly to the last client, and the bench wants per_client rows each
        partition=PartitionConfig(
            kind="iid", iid_rule="random_chunks", num_clients=clients, min_samples=1, seed=seed
        ),
    )
