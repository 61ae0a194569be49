"""Reading an ``.npz`` of plain arrays without believing its headers.

``np.load(allow_pickle=False)`` refuses pickles, but trusts each member's header: it
allocates whatever shape the header claims before reading a byte, so a header claiming
1 TiB ends in ``MemoryError`` and one claiming 1 GiB ends in an "EOF" ``ValueError``. Both
kinds of file reach a device: a user's ``--input``, and a bundle's self-test vectors.

``read_npz`` reads the zip directory and every member's ``.npy`` header first, and refuses,
before allocating anything:

- a member that is not an ``.npy`` array, a name used twice, or a compression other than
  the two ``np.savez`` and ``np.savez_compressed`` write;
- an array of Python objects (it would need a pickle, which can run code);
- a shape whose bytes are not the bytes the member holds, or more than its compressed
  bytes can inflate to (deflate expands at most 1032 times);
- arrays that together need more memory than the machine has (or a caller's budget).

The caller picks the error class, so the message lands where the file came from: an
``InputSignatureError`` for ``--input``, a ``BundleError`` for a bundle's vectors.
"""

from __future__ import annotations

import math
import os
import zipfile
import zlib
from pathlib import Path

import numpy as np

from .errors import EdgeRuntimeError

NPY_SUFFIX = ".npy"
DEFLATE_MAX_RATIO = 1032  # the most deflate can expand its input (258-byte copies)
COMPRESSIONS = (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED)
SAVE_HINT = "save plain numeric arrays with np.savez(path, name=array, ...)"

# What the zip and npy readers raise on a malformed file.
_READ_ERRORS = (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error, KeyError)


def memory_budget() -> int | None:
    """This machine's physical memory in bytes (None where the system does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def human_bytes(count: int) -> str:
    """``count`` bytes as a short figure, e.g. "1.0 TiB"."""
    value = float(count)
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if value < 1024 or unit == "PiB":
            return f"{count} bytes" if unit == "bytes" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _header(member, label: str, name: str, error: type[EdgeRuntimeError]):
    """(shape, dtype, header length) of the ``.npy`` member open in ``member``."""
    version = np.lib.format.read_magic(member)
    if version == (1, 0):
        shape, _, dtype = np.lib.format.read_array_header_1_0(member)
    elif version == (2, 0):
        shape, _, dtype = np.lib.format.read_array_header_2_0(member)
    else:
        raise error(f"{label}: {name} is .npy format {version}, which is not read; {SAVE_HINT}")
    return shape, dtype, member.tell()


def _check_member(
    archive: zipfile.ZipFile,
    info: zipfile.ZipInfo,
    file_size: int,
    label: str,
    error: type[EdgeRuntimeError],
    objects_error: type[EdgeRuntimeError],
) -> int:
    """The bytes member ``info`` will take once read; refuses anything the file cannot back."""
    name = info.filename
    if not name.endswith(NPY_SUFFIX) or info.is_dir():
        raise error(f"{label}: member {name!r} is not an .npy array; {SAVE_HINT}")
    if info.compress_type not in COMPRESSIONS:
        raise error(
            f"{label}: member {name!r} uses zip compression {info.compress_type}; only stored "
            f"and deflated members are read ({SAVE_HINT}, or np.savez_compressed)"
        )
    if info.header_offset + info.compress_size > file_size:
        raise error(
            f"{label}: member {name!r} declares {info.compress_size} bytes but the file ends "
            "before them; the file is truncated or was crafted"
        )
    stored = info.compress_type == zipfile.ZIP_STORED
    if (stored and info.file_size != info.compress_size) or (
        info.file_size > info.compress_size * DEFLATE_MAX_RATIO + 64
    ):
        raise error(
            f"{label}: member {name!r} claims {info.file_size} bytes from "
            f"{info.compress_size} compressed ones, more than "
            f"{'storing' if stored else 'deflate'} can give; the file was crafted"
        )
    with archive.open(info) as member:
        shape, dtype, header = _header(member, label, name, error)
    if dtype.hasobject:
        raise objects_error(
            f"{label}: array {name[: -len(NPY_SUFFIX)]!r} holds Python objects: pickled "
            f"arrays are refused (a pickle can run code); {SAVE_HINT}"
        )
    nbytes = math.prod(shape) * dtype.itemsize
    held = info.file_size - header
    if nbytes != held:
        claim = f"{dtype}[{', '.join(map(str, shape))}]"
        raise error(
            f"{label}: array {name[: -len(NPY_SUFFIX)]!r} declares {claim}, "
            f"{human_bytes(nbytes)}, but the file holds {human_bytes(max(held, 0))} of it; "
            "the file is truncated or was crafted"
        )
    return nbytes


def read_npz(
    path: str | Path,
    error: type[EdgeRuntimeError] = EdgeRuntimeError,
    *,
    label: str | None = None,
    budget: int | None = None,
    objects_error: type[EdgeRuntimeError] | None = None,
) -> dict[str, np.ndarray]:
    """Every array of the ``.npz`` at ``path``, by name, each header checked first.

    Args:
        path: the ``.npz`` file.
        error: the class of the error raised for a bad file.
        label: how messages name the file (default: its path).
        budget: most bytes the arrays may take together (default: this machine's memory).
        objects_error: the class raised for an array of Python objects (default:
            ``error``), for a caller whose users make them by accident, e.g. from samples
            of different shapes, and who says so rather than speak of pickles.

    Raises:
        error: the file is missing, not an ``.npz``, truncated, crafted, holds pickled
            objects, or needs more memory than the budget; the message says which.
    """
    path = Path(path)
    label = label or str(path)
    try:
        with open(path, "rb") as handle:
            magic = handle.read(len(np.lib.format.MAGIC_PREFIX))
            file_size = os.fstat(handle.fileno()).st_size
    except FileNotFoundError:
        raise error(f"{label} does not exist") from None
    except OSError as exc:
        raise error(f"{label} cannot be read: {exc}") from None
    if magic == np.lib.format.MAGIC_PREFIX:
        raise error(f"{label} holds a single array, not an .npz of named arrays; {SAVE_HINT}")
    budget = memory_budget() if budget is None else budget
    try:
        with zipfile.ZipFile(path) as archive:
            infos = archive.infolist()
            names = [info.filename for info in infos]
            if twice := sorted({name for name in names if names.count(name) > 1}):
                raise error(f"{label}: members {twice} appear twice; the file was crafted")
            needed = sum(
                _check_member(archive, info, file_size, label, error, objects_error or error)
                for info in infos
            )
            if budget is not None and needed > budget:
                raise error(
                    f"{label}: the arrays need {human_bytes(needed)}, more than the "
                    f"{human_bytes(budget)} available; split the file into smaller ones"
                )
            arrays = {}
            for info in infos:
                with archive.open(info) as member:
                    array = np.lib.format.read_array(member, allow_pickle=False)
                arrays[info.filename[: -len(NPY_SUFFIX)]] = array
            return arrays
    except _READ_ERRORS as exc:
        raise error(f"{label} is not a readable .npz of plain arrays: {exc}") from None
