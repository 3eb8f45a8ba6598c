"""Offline assets: a tiny CLIP and a small real image dataset, built locally, no hub needed.

``flora-offline/tiny-clip`` and ``flora-offline/digits`` are names the model and data
loaders resolve to local directories (built on first use under :func:`cache_dir`). They are
then loaded through the very same ``from_pretrained`` / ``datasets.load_dataset`` code as hub
ids, so the offline path exercises the real loading code.
"""

from flora_lightning.offline.cache import cache_dir
from flora_lightning.offline.digits import OFFLINE_DIGITS, digits_data_files
from flora_lightning.offline.tiny_clip import OFFLINE_TINY_CLIP, tiny_clip_path

__all__ = [
    "OFFLINE_DIGITS",
    "OFFLINE_TINY_CLIP",
    "cache_dir",
    "digits_data_files",
    "tiny_clip_path",
]
