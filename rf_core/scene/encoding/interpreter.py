"""Whether Triton runs its kernels interpreted (on the CPU, with numpy): read by the backend
choice and by the Triton backend itself, without importing Triton."""

from __future__ import annotations

import os


def triton_interpreting() -> bool:
    """True when ``TRITON_INTERPRET`` asks for Triton's (CPU, numpy) interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")
