"""Fail fast without the Hugging Face hub.

Without network, ``from_pretrained``/``load_dataset`` on a hub id retry for tens of seconds
before failing. When the hub host cannot even be reached (one TCP connect, 3 s timeout), we
switch the libraries to offline mode for the call: a cached copy still loads, anything else
fails at once with our clear error.
"""

from __future__ import annotations

import os
import socket
from contextlib import ExitStack, contextmanager
from functools import lru_cache
from pathlib import Path
from unittest import mock
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


@contextmanager
def offline_unless_reachable(name: str):
    """Offline mode for hub lookups of ``name`` when it is not local and the hub is unreachable."""
    import datasets.config
    import huggingface_hub.constants

    if Path(name).exists() or hub_reachable():
        yield
        return
    with ExitStack() as stack:
        stack.enter_context(mock.patch.object(huggingface_hub.constants, "HF_HUB_OFFLINE", True))
        stack.enter_context(mock.patch.object(datasets.config, "HF_HUB_OFFLINE", True))
        yield
