"""``flora-offline/tiny-clip``: a small CLIP built from a config, briefly pre-trained offline.

Why pre-trained: a randomly initialised image tower maps all images to nearly the same feature
(cosine ~0.997 measured), so no text-side adapter can learn from it. So the build

1. creates a byte-level ``CLIPTokenizer`` (every byte is a token, no merges: any text works
   offline) whose EOS id matches the text config, so pooling reads the real EOS position;
2. builds ``CLIPModel`` from a ``CLIPConfig`` (2 layers, width 64, 32x32 images, patch 4);
3. pre-trains it for a few hundred steps on the digits ``pretrain`` split only (disjoint from
   the federated train/test data), captions being the bare class word ("seven"), with the
   logit scale fixed at 100 like OpenAI CLIP;
4. saves model + processor with ``save_pretrained`` (weights as ``model.safetensors``), so it
   loads through ``from_pretrained(..., use_safetensors=True)`` as every model does.

The federated task then uses a different template ("a photo of the digit {}."), so zero-shot
accuracy starts well below what federated LoRA reaches.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from flora_lightning.offline.cache import build_once, cache_dir

OFFLINE_TINY_CLIP = "flora-offline/tiny-clip"
_VERSION = "v1"
PRETRAIN_STEPS = 400
PRETRAIN_LR = 3e-4
IMAGE_SIZE = 32


def build_tokenizer(words: Sequence[str] = ()):
    """Byte-level CLIP tokenizer: 256 byte symbols, their end-of-word forms, BOS and EOS.

    Args:
        words: lower-case words to merge into single tokens, as CLIP's real BPE does for
            common English words ("photo", "airplane"): each gets the chain of BPE merges
            that assembles it, so captions have realistic token counts (benchmarks use this;
            the tiny CLIP does not).
    """
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    symbols = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {s: i for i, s in enumerate(symbols)}
    vocab.update({s + "</w>": len(symbols) + i for i, s in enumerate(symbols)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    merges: list[tuple[str, str]] = []
    for word in dict.fromkeys(words):
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        merged = pieces[0]
        for piece in pieces[1:]:
            if (merged, piece) not in merges:
                merges.append((merged, piece))
            merged += piece
            vocab.setdefault(merged, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=merges)


def build_config(tokenizer):
    """A 2-layer, width-64 CLIP whose text config agrees with the tokenizer on BOS/EOS/pad."""
    from transformers import CLIPConfig

    text = dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    vision = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=IMAGE_SIZE,
        patch_size=4,
    )
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=64)


def _pretrain(model, tokenizer, transform) -> None:
    import datasets

    from flora_lightning.clip.features import image_features, text_features
    from flora_lightning.offline.digits import CLASS_NAMES, digits_data_files

    data = datasets.load_dataset("parquet", data_files=digits_data_files(), split="pretrain")
    pixels = torch.stack([transform(image) for image in data["image"]])
    labels = torch.tensor(data["label"])
    captions = tokenizer(CLASS_NAMES, padding=True, return_tensors="pt")
    generator = torch.Generator().manual_seed(0)
    model.logit_scale.data.fill_(math.log(100.0))
    model.logit_scale.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=PRETRAIN_LR)
    model.train()
    for _ in range(PRETRAIN_STEPS):
        batch = torch.randint(len(labels), (64,), generator=generator)
        img = F.normalize(image_features(model, pixels[batch]), dim=-1)
        txt = F.normalize(text_features(model, **captions), dim=-1)
        loss = F.cross_entropy(100.0 * img @ txt.T, labels[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.logit_scale.requires_grad_(True)
    model.eval()


def _build(folder: Path) -> None:
    from transformers import CLIPImageProcessor, CLIPModel, CLIPProcessor

    from flora_lightning.clip.features import build_image_transform

    tokenizer = build_tokenizer()
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )
    # fork_rng: building on first use must not move the caller's RNG (the LoRA init drawn
    # right after would differ from a run that found the model already cached).
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = CLIPModel(build_config(tokenizer))
        _pretrain(model, tokenizer, build_image_transform(image_processor))
    model.save_pretrained(folder)
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)


def tiny_clip_path() -> Path:
    """Build the tiny CLIP on first use (seconds: a short pre-training) and return its folder."""
    return build_once(cache_dir() / f"tiny-clip-{_VERSION}", _build)
