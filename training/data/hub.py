"""A fast "can we reach the Hugging Face hub?" check.

Without network, ``datasets`` and ``transformers`` retry for ~25-50 s before failing
(measured here); a single TCP connect with a short timeout tells us the same in well
under a second when DNS fails, so callers can raise a clear one-line error instead.
"""

from __future__ import annotations

import socket
from urllib.parse import urlparse


def hub_offline_mode() -> bool:
    """True when the user asked for offline mode (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE / TRANSFORMERS_OFFLINE)."""
    import datasets.config
    from huggingface_hub import constants

    return bool(datasets.config.HF_HUB_OFFLINE or constants.HF_HUB_OFFLINE)


def hub_reachable(timeout_s: float = 3.0) -> bool:
    """One TCP connect to the hub endpoint (honours HF_ENDPOINT); False on DNS or connect failure."""
    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    host = url.hostname or "huggingface.co"
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False
