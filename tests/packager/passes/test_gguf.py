"""GGUF passes at their seam: the quantize type check (measuring: test_measure.py)."""

from __future__ import annotations

import pytest

from packager.errors import PackagerError
from packager.passes import GgufQuantize


@pytest.mark.parametrize("bad", ["Q4_KM", "q4_k_m", "INT8", ""])
def test_quantize_refuses_an_unknown_type_when_configured(bad):
    with pytest.raises(PackagerError) as caught:
        GgufQuantize({"quant_type": bad})

    assert "unknown llama.cpp quantization type" in str(caught.value)
    assert "Q4_K_M" in str(caught.value)
