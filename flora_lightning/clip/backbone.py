"""Loading HF ``CLIPModel`` checkpoints and computing their features.

One place for: resolving ``flora-offline/tiny-clip`` and turning hub/offline failures into a
clear error. The preprocessing and feature functions live in the leaf module
:mod:`flora_lightning.clip.features` (which ``offline/`` builds on) and are re-exported here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torchvision.transforms import v2

from flora_lightning.clip.features import build_image_transform, image_features, text_features
from flora_lightning.clip.hub import NotAvailableError, local_files_only
from flora_lightning.clip.preprocess import DevicePreprocess

__all__ = [
    "CLIPBundle",
    "ModelNotAvailableError",
    "build_image_transform",
    "image_features",
    "load_clip",
    "resolve_model_path",
    "text_features",
]

OFFLINE_HINT = (
    "No access to the Hugging Face hub here? Download it once where you have internet "
    "(`hf download {name} --local-dir DIR`) and pass the folder instead, e.g. "
    "--model.name_or_path DIR; or use the built-in offline model flora-offline/tiny-clip."
)
PICKLE_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")
"""Weight files that are Python pickles: loading one can run code, so they are never loaded."""
CONVERT_HINT = (
    "flora loads model weights from safetensors files only: unpickling a .bin/.pt file can run "
    'arbitrary code. Convert the checkpoint once, where you trust it: python -c "from '
    "transformers import CLIPModel; CLIPModel.from_pretrained('{path}', "
    "use_safetensors=False).save_pretrained('{path}')\" (writes model.safetensors), then "
    "load it again."
)


class ModelNotAvailableError(NotAvailableError):
    """The CLIP checkpoint could not be loaded from the hub or the given path."""


@dataclass
class CLIPBundle:
    """A loaded CLIP checkpoint: the model, its tokenizer and its image preprocessing."""

    model: torch.nn.Module
    tokenizer: object
    image_transform: v2.Compose
    """Per image, on the CPU in the loader (``data.preprocess: processor``)."""
    device_preprocess: DevicePreprocess | None = None
    """The same in batches of decoded uint8 images on the model's device
    (``data.preprocess: device``); None: not available for this bundle."""


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
    refuse_pickle_weights(path, field)
    try:
        local_only = local_files_only(path)
        # safetensors only, for a hub id too: a pickle weight file is never unpickled
        model = CLIPModel.from_pretrained(path, local_files_only=local_only, use_safetensors=True)
        processor = AutoProcessor.from_pretrained(path, local_files_only=local_only)
    except (OSError, ValueError) as err:
        hint = OFFLINE_HINT.format(name=name_or_path)
        if Path(path).exists():
            hint = "The folder exists but is not a CLIP checkpoint saved with save_pretrained."
        elif "safetensors" in str(err):
            hint = (
                f"{CONVERT_HINT.format(path='DIR')} Get DIR with `hf download {name_or_path} "
                "--local-dir DIR`."
            )
        raise ModelNotAvailableError(
            f"{field}: could not load CLIP model '{name_or_path}' ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else err}). {hint}"
        ) from err
    image_processor = processor.image_processor
    return CLIPBundle(
        model,
        processor.tokenizer,
        build_image_transform(image_processor),
        DevicePreprocess.from_processor(image_processor),
    )


def refuse_pickle_weights(path: str, field: str = "model.name_or_path") -> None:
    """Refuse a local checkpoint folder whose weights exist only as pickle files.

    Raises:
        ModelNotAvailableError: naming ``field``, the folder, its pickle files and how to
            convert them to safetensors.
    """
    folder = Path(path)
    if not folder.is_dir() or any(folder.glob("*.safetensors")):
        return
    pickles = sorted({p.name for pattern in PICKLE_WEIGHTS for p in folder.glob(pattern)})
    if pickles:
        raise ModelNotAvailableError(
            f"{field}: {folder} holds its weights only as pickle files ({', '.join(pickles)}) "
            f"and no .safetensors file. {CONVERT_HINT.format(path=folder)}"
        )
