"""``--batch-axis``, ``--constant`` and ``--state``, checked against the model's signature.

What a build is told about feeding its model becomes the manifest's ``feeding`` section
(``edge_runtime.manifest.FeedingSpec``), so the device feeds the model as the gate did.
Every name, axis and value is checked here, once the model's inputs are known and before
any data is read or any recipe runs; each refusal says how to fix the flag.
"""

from __future__ import annotations

import json
from typing import Any

from edge_runtime.manifest import FeedingSpec, TensorSpec

from .errors import DataError


def _names(specs: list[TensorSpec]) -> str:
    return ", ".join(spec.describe() for spec in specs) or "none"


def feeding_spec(
    settings: Any, inputs: list[TensorSpec], outputs: list[TensorSpec]
) -> FeedingSpec | None:
    """The manifest's feeding section from the build settings; None when there is nothing
    to record (the plain case: samples on axis 0, no constant, no state).

    Raises:
        DataError: an unknown input or output, an axis out of range or on a fixed size
            other than 1, a constant that does not fit its input's dtype or shape, a state
            whose output does not match its input, or one input named by two of the flags.
    """
    batch_axis: dict[str, int] = dict(getattr(settings, "batch_axis", {}) or {})
    constant: dict[str, str] = dict(getattr(settings, "constant", {}) or {})
    state: dict[str, str] = dict(getattr(settings, "state", {}) or {})
    if not (batch_axis or constant or state):
        return None
    by_input = {spec.name: spec for spec in inputs}
    by_output = {spec.name: spec for spec in outputs}
    signature = f"the model's inputs: {_names(inputs)}; outputs: {_names(outputs)}"

    constants = {}
    for name, text in constant.items():
        if name not in by_input:
            raise DataError(
                f"--constant {name}={text}: the model has no input {name!r}; {signature}"
            )
        constants[name] = constant_value(by_input[name], text).tolist()

    input_axes, output_axes = {}, {}
    for name, axis in batch_axis.items():
        flag = f"--batch-axis {name}={axis}"
        if name in constants:
            raise DataError(
                f"{flag}: input {name!r} is a --constant, fed as given, so it has no batch "
                "axis; drop one of the two flags"
            )
        spec = by_input.get(name) or by_output.get(name)
        if spec is None:
            raise DataError(f"{flag}: the model has no input or output {name!r}; {signature}")
        check_batch_axis(spec, axis, flag)
        if axis != 0:
            (input_axes if name in by_input else output_axes)[name] = int(axis)

    for name, output in state.items():
        flag = f"--state {name}={output}"
        if name not in by_input:
            raise DataError(f"{flag}: the model has no input {name!r}; {signature}")
        if name in constants:
            raise DataError(
                f"{flag}: input {name!r} is also a --constant; a state changes from step to "
                "step, so drop one of the two flags"
            )
        if output not in by_output:
            raise DataError(f"{flag}: the model has no output {output!r}; {signature}")
        source, target = by_output[output], by_input[name]
        if source.dtype != target.dtype or len(source.shape) != len(target.shape):
            raise DataError(
                f"{flag}: output {source.describe()} cannot feed input {target.describe()}; "
                "a state output needs the input's dtype and rank"
            )
    if len(set(state.values())) != len(state):
        raise DataError(f"--state names one output for two inputs: {state}")
    return FeedingSpec(
        constants=constants, batch_axes=input_axes, output_batch_axes=output_axes, state=state
    )


def check_batch_axis(spec: TensorSpec, axis: int, flag: str) -> None:
    """Refuse an axis out of range, or one whose fixed size is not 1 (no batch of one fits)."""
    rank = len(spec.shape)
    if rank == 0:
        raise DataError(
            f"{flag}: {spec.describe()} is a scalar, with no batch axis; a fixed input "
            f"takes --constant {spec.name}=VALUE"
        )
    if not 0 <= axis < rank:
        raise DataError(
            f"{flag}: {spec.describe()} has {rank} axes, so its batch axis is one of 0..{rank - 1}"
        )
    size = spec.shape[axis]
    if isinstance(size, int) and size != 1:
        free = [str(i) for i, dim in enumerate(spec.shape) if not isinstance(dim, int) or dim == 1]
        hint = f" (axes of size 1 or free: {', '.join(free)})" if free else ""
        raise DataError(
            f"{flag}: {spec.describe()} has size {size} on axis {axis}, so a batch of one "
            f"cannot go there; give the axis that holds the batch{hint}"
        )


def _is_numeric(value: Any) -> bool:
    if isinstance(value, list):
        return bool(value) and all(_is_numeric(item) for item in value)
    return isinstance(value, bool | int | float)


def constant_value(spec: TensorSpec, text: str):
    """``text`` (a number or a JSON list) as an array of ``spec``'s dtype and shape.

    A single number fills an input of fixed shape (``--constant threshold=0.5`` for a
    [1] input); a list must have the input's rank and fixed sizes.

    Raises:
        DataError: not a number or rectangular JSON list, a value the dtype cannot hold
            (a fraction or an out-of-range value for an integer input), or the wrong shape.
    """
    import numpy as np

    where = f"--constant {spec.name}={text}"
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = None
    if not _is_numeric(value):
        raise DataError(f"{where}: give a number or a JSON list of numbers, e.g. 16000 or [1, 2]")
    try:
        array = np.array(value)
    except ValueError:
        raise DataError(f"{where}: the list is ragged; give a rectangular JSON list") from None
    dtype = np.dtype(spec.dtype)
    if dtype.kind == "b":
        if array.dtype.kind != "b" and not np.isin(array, (0, 1)).all():
            raise DataError(f"{where}: input {spec.name!r} is bool; give true/false or 0/1")
    elif dtype.kind in "iu":
        integral = array.dtype.kind in "iu" or (
            array.dtype.kind == "f"
            and bool(np.all(np.isfinite(array) & (array == np.round(array))))
        )
        if not integral:
            raise DataError(f"{where}: input {spec.name!r} is {dtype}; give whole numbers")
        info = np.iinfo(dtype)
        if array.size and (array.min() < info.min or array.max() > info.max):
            raise DataError(
                f"{where}: input {spec.name!r} is {dtype}, which holds {info.min}..{info.max}"
            )
    elif dtype.kind == "f":
        if array.dtype.kind == "b":
            raise DataError(f"{where}: input {spec.name!r} is {dtype}; give a number")
        limit = float(np.finfo(dtype).max)
        if np.any(np.abs(array[np.isfinite(array)]) > limit):
            raise DataError(
                f"{where}: input {spec.name!r} is {dtype}, which holds at most {limit:g}"
            )
    else:
        raise DataError(f"{where}: input {spec.name!r} is {dtype}; --constant takes numbers only")
    cast = array.astype(dtype)
    return _shaped(spec, cast, where)


def _shaped(spec: TensorSpec, cast, where: str):
    import numpy as np

    shape = spec.shape
    fixed = all(isinstance(dim, int) for dim in shape)
    if not shape:
        if cast.ndim:
            raise DataError(f"{where}: input {spec.describe()} is a scalar; give one number")
        return cast
    if cast.ndim == 0:
        if not fixed:
            raise DataError(
                f"{where}: input {spec.describe()} has free axes; give a JSON list in its shape"
            )
        return np.full(shape, cast, dtype=cast.dtype)
    fits = cast.ndim == len(shape) and all(
        not isinstance(dim, int) or dim == size for dim, size in zip(shape, cast.shape, strict=True)
    )
    if not fits:
        raise DataError(
            f"{where}: the value has shape {list(cast.shape)}, but input {spec.describe()} "
            "needs its shape"
        )
    return cast
