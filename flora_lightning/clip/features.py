"""CLIP preprocessing and features: a leaf module (no flora imports), shared by the methods,
the bench and the offline tiny-CLIP builder.

The image preprocessing is built from the checkpoint's own processor config; the feature
functions hide the transformers 4/5 difference in what ``get_*_features`` return.
"""

from __future__ import annotations

import torch
from torchvision.transforms import v2


def build_image_transform(image_processor) -> v2.Compose:
    """CLIP preprocessing from the checkpoint's processor config: resize, centre crop, normalise."""
    size = image_processor.size
    short_edge = size.get("shortest_edge") or min(size.get("height"), size.get("width"))
    crop = image_processor.crop_size
    return v2.Compose(
        [
            v2.RGB(),
            v2.ToImage(),
            v2.Resize(short_edge, interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
            v2.CenterCrop((crop["height"], crop["width"])),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(
                mean=list(image_processor.image_mean), std=list(image_processor.image_std)
            ),
        ]
    )


def _pooled(output) -> torch.Tensor:
    # transformers 5 returns BaseModelOutputWithPooling; 4.x returned the tensor itself.
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def text_features(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Projected (unnormalised) text embeddings."""
    return _pooled(model.get_text_features(input_ids=input_ids, attention_mask=attention_mask))


def image_features(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """Projected (unnormalised) image embeddings."""
    return _pooled(model.get_image_features(pixel_values=pixel_values))
