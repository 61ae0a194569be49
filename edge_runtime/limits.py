"""What a bundle may hold: member names and tensor dtypes, checked before anything is written.

A bundle comes from a build host, but a device must not crash, nor write outside its
folder, when that host or its key is compromised. So the rules are plain data, applied to
the archive's member names before the signature is checked and to the manifest when it is
parsed: every name here can be created on any filesystem a device extracts to, and every
dtype is one numpy knows without plugins.
"""

from __future__ import annotations

import re

# A component: letters, digits, '.', '_', '-', '+', not starting with '.' (so no '.', '..'
# or hidden files) nor '-' (read as an option by tools). edgepack writes
# model/model.onnx, model/model.tflite, model/model.gguf and selftest/vectors.npz.
COMPONENT = re.compile(r"[A-Za-z0-9_+][A-Za-z0-9._+-]*")
MAX_COMPONENT_CHARS = 255  # NAME_MAX on Linux, macOS and Windows
MAX_PATH_CHARS = 1024  # well under PATH_MAX (4096) once a device's folder is prepended
NAME_RULE = (
    "bundles name members with '/'-separated components of letters, digits, '.', '_', '-' "
    f"and '+' (at most {MAX_COMPONENT_CHARS} characters each, {MAX_PATH_CHARS} in all)"
)

# numpy dtype names a model's inputs and outputs may have: plain numbers and booleans
# (object arrays would need pickles, and extension types a plugin the device may lack).
TENSOR_DTYPES = frozenset(
    {
        "bool",
        "int8",
        "int16",
        "int32",
        "int64",
        "uint8",
        "uint16",
        "uint32",
        "uint64",
        "float16",
        "float32",
        "float64",
        "complex64",
        "complex128",
    }
)


def path_problem(path: str) -> str | None:
    """Why ``path`` cannot name a bundle member, or None when it can."""
    if not isinstance(path, str) or not path:
        return "the path is empty"
    if len(path) > MAX_PATH_CHARS:
        return f"the path is {len(path)} characters; at most {MAX_PATH_CHARS}"
    if path.startswith("/"):
        return "the path is absolute"
    for component in path.split("/"):
        if component in ("", ".", ".."):
            return f"component {component!r} is not allowed (no empty, '.' or '..' components)"
        if len(component) > MAX_COMPONENT_CHARS:
            return (
                f"component {component[:16]!r}... is {len(component)} characters; "
                f"at most {MAX_COMPONENT_CHARS}"
            )
        if not COMPONENT.fullmatch(component):
            return f"component {component!r} is not allowed"
    return None


def dtype_problem(dtype: str) -> str | None:
    """Why ``dtype`` cannot be a model input's or output's dtype, or None when it can."""
    if dtype in TENSOR_DTYPES:
        return None
    return f"dtype {dtype!r} is not a tensor dtype ({', '.join(sorted(TENSOR_DTYPES))})"
