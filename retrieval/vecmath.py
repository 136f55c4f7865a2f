"""Row-wise L2 normalisation: every vector the engine stores or compares is unit length."""

from __future__ import annotations

import numpy as np

_UNIT_TOL = 1e-6


def l2_normalize(x, keep_unit: bool = False) -> np.ndarray:
    """Rows of `x` scaled to unit length, as float32. With keep_unit, rows already unit-norm (within 1e-6) are
    returned bit for bit, so normalising twice changes nothing (fusion relies on that)."""
    x = np.asarray(x, dtype=np.float32)
    n = np.linalg.norm(x, axis=-1, keepdims=True)
    if not keep_unit:
        return x / np.maximum(n, 1e-12)
    scale = np.where(np.abs(n - 1.0) <= _UNIT_TOL, np.float32(1.0), 1.0 / np.maximum(n, 1e-12)).astype(np.float32)
    return np.ascontiguousarray(x * scale, dtype=np.float32)
