"""Fail fast without the Hugging Face hub, through the libraries' public switches.

Without network, ``from_pretrained``/``load_dataset`` on a hub id retry for tens of seconds
before failing. When a name is not a
local path and the hub is off (``HF_HUB_OFFLINE``, :func:`huggingface_hub.is_offline_mode`) or
cannot be reached (one TCP connect to ``$HF_ENDPOINT``, 3 s timeout, once per process), loading
uses local files only, so a cached copy still loads and anything else fails at once with the
caller's clear error:

- models: :func:`local_files_only` is passed as ``from_pretrained(..., local_files_only=...)``;
- datasets: ``load_dataset`` has no such argument, and ``datasets`` reads ``HF_HUB_OFFLINE``
  only when it is imported, so :func:`dataset_path` resolves a hub id to its cached snapshot
  folder with ``huggingface_hub.snapshot_download(..., local_files_only=True)`` and that folder
  is loaded. With ``HF_HUB_OFFLINE`` set, ``datasets`` is offline itself and uses its own caches.
"""

from __future__ import annotations

import os
import socket
from functools import lru_cache
from pathlib import Path
from urllib.parse import urlparse


class NotAvailableError(RuntimeError):
    """A model or dataset could not be loaded (offline, wrong id or path)."""


@lru_cache(maxsize=1)
def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the hub endpoint (``$HF_ENDPOINT``) succeeds."""
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        with socket.create_connection((endpoint.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def local_files_only(name: str) -> bool:
    """Whether ``name`` must load from local files only: it is not a local path, and the hub
    is off (``HF_HUB_OFFLINE``) or unreachable. The value for ``from_pretrained``'s
    ``local_files_only=``."""
    from huggingface_hub import is_offline_mode

    return not Path(name).exists() and (is_offline_mode() or not hub_reachable())


def dataset_path(name: str) -> str:
    """What to pass to ``datasets.load_dataset`` for ``name``.

    ``name`` itself, except for a hub id (``owner/name``, not a local path) when the hub cannot
    be reached and offline mode is not on: then the folder of its locally cached snapshot
    (``snapshot_download(..., repo_type="dataset", local_files_only=True)``; ``datasets`` keeps
    a hub dataset's downloaded files in that cache).

    Raises:
        huggingface_hub.errors.LocalEntryNotFoundError: no cached snapshot of ``name`` (at once,
            without touching the network).
    """
    from huggingface_hub import is_offline_mode, snapshot_download

    if name.count("/") != 1 or not local_files_only(name) or is_offline_mode():
        return name
    return snapshot_download(name, repo_type="dataset", local_files_only=True)
