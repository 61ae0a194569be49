"""``build_bundle``: what ``edgepack build`` calls; the work is ``packager.pipeline``'s.

Kept as the stable entry point for callers (the CLI, the examples, scripts and tests).
"""

from __future__ import annotations

from collections.abc import Callable

from .pipeline import BuildResult, build
from .settings import BuildConfig

__all__ = ["BuildConfig", "BuildResult", "build_bundle"]


def build_bundle(
    config: BuildConfig, progress: Callable[[str], None] = lambda message: None
) -> BuildResult:
    """Build, gate, measure and sign one bundle (see ``packager.pipeline``).

    Raises:
        PackagerError (or a subclass): anything the user can fix; the message says how.
    """
    return build(config, progress)
