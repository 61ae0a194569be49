"""Comparisons of float outputs computed by different kernels, engines or CPUs.

Summation order differs between kernels (XNNPACK against the reference ones, one
converter against another, x86 against ARM), so two correct results differ by an amount
that grows with the size of the values. An absolute tolerance alone fails on large
logits and hides errors on small ones; these helpers scale it to the values' magnitude.
"""

from __future__ import annotations

import numpy as np


def assert_close_across_kernels(actual, expected, rtol: float = 1e-4) -> None:
    """Elementwise ``|a - e| <= rtol * |e| + rtol * max|e|``.

    The second term keeps values near zero (where a relative bound is meaningless)
    within the same float noise as the largest value of the tensor.
    """
    expected = np.asarray(expected, dtype=np.float64)
    scale = float(np.abs(expected).max()) if expected.size else 0.0
    np.testing.assert_allclose(
        np.asarray(actual, dtype=np.float64), expected, rtol=rtol, atol=rtol * max(scale, 1e-12)
    )
