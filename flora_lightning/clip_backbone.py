"""Loading HF ``CLIPModel`` checkpoints and computing their features.

One place for: resolving ``flora-offline/tiny-clip``, turning hub/offline failures into a clear
error, building the image preprocessing from the checkpoint's own processor config, and the
transformers 4/5 difference in what ``get_*_features`` return.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torchvision.transforms import v2

from flora_lightning.hub import NotAvailableError, offline_unless_reachable

OFFLINE_HINT = (
    "No access to the Hugging Face hub here? Download it once where you have internet "
    "(`hf download {name} --local-dir DIR`) and pass the folder instead, e.g. "
    "--model.name_or_path DIR; or use the built-in offline model flora-offline/tiny-clip."
)


class ModelNotAvailableError(NotAvailableError):
    """The CLIP checkpoint could not be loaded from the hub or the given path."""


@dataclass
class CLIPBundle:
    """A loaded CLIP checkpoint: the model, its tokenizer and its image preprocessing."""

    model: torch.nn.Module
    tokenizer: object
    image_transform: v2.Compose


def resolve_model_path(name_or_path: str) -> str:
    """Map ``flora-offline/tiny-clip`` to its locally built folder; anything else is unchanged."""
    from flora_lightning.offline.tiny_clip import OFFLINE_TINY_CLIP, tiny_clip_path

    if name_or_path == OFFLINE_TINY_CLIP:
        return str(tiny_clip_path())
    return name_or_path


def load_clip(name_or_path: str, field: str = "model.name_or_path") -> CLIPBundle:
    """Load model, tokenizer and image processor with ``from_pretrained`` (hub id or folder).

    Raises:
        ModelNotAvailableError: naming ``field``, the checkpoint, and how to use a local copy.
    """
    from transformers import AutoProcessor, CLIPModel

    path = resolve_model_path(name_or_path)
    try:
        with offline_unless_reachable(path):
            model = CLIPModel.from_pretrained(path)
            processor = AutoProcessor.from_pretrained(path)
    except (OSError, ValueError) as err:
        hint = OFFLINE_HINT.format(name=name_or_path)
        if Path(path).exists():
            hint = "The folder exists but is not a CLIP checkpoint saved with save_pretrained."
        raise ModelNotAvailableError(
            f"{field}: could not load CLIP model '{name_or_path}' ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else err}). {hint}"
        ) from err
    return CLIPBundle(model, processor.tokenizer, build_image_transform(processor.image_processor))


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
