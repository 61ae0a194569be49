"""edge_runtime: verify an edgepack bundle and run it offline on the device.

Kept lean: importing this package loads no inference engine. ``Runtime.open`` picks the
backend the bundle's manifest names and imports only that engine.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

__version__ = "0.1.0"
__all__ = ["Runtime", "__version__"]

if TYPE_CHECKING:
    from .runtime import Runtime


def __getattr__(name: str):
    if name == "Runtime":
        from .runtime import Runtime

        return Runtime
    raise AttributeError(name)
