"""Multi-resolution hash-grid encoding (Instant-NGP) with interchangeable backends.

``HashGridEncoding(HashGridConfig())`` picks tiny-cuda-nn on CUDA when it is installed and
the pure-PyTorch path otherwise; both read one flat parameter table in tcnn's layout.
"""

from rf_core.scene.encoding.backends import available_backends, resolve_backend
from rf_core.scene.encoding.config import HashGridConfig
from rf_core.scene.encoding.hashgrid import HashGridEncoding

__all__ = ["HashGridConfig", "HashGridEncoding", "available_backends", "resolve_backend"]
