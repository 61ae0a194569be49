"""Self-test vectors: which eval samples a bundle keeps, and the bounds the device meets.

The vectors hold the bundled model's own outputs on the build host, and each output gets
a bound for how far another CPU may compute differently (``output_bound``). How many
samples are kept follows a size budget, so the vectors stay small next to the model.
"""

from __future__ import annotations

import io
import math
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import numpy as np

from edge_runtime.feeding import Feeder
from edge_runtime.manifest import SelfTestBound, SelfTestSpec
from edge_runtime.selftest import (
    ALTERNATE_PREFIX,
    INPUT_PREFIX,
    REFERENCE_PREFIX,
    cosine_rows,
)

# The default budget: vectors may take 10% of the model file, or 1 MiB for small models,
# and no more than 8 samples (more adds little: the test is for a broken runtime).
BUDGET_FRACTION = 0.10
BUDGET_FLOOR_BYTES = 1 << 20
MAX_DEFAULT_VECTORS = 8
_FIXED_DATE = (1980, 1, 1, 0, 0, 0)  # no wall-clock time in the archive: reproducible bytes


@dataclass(frozen=True)
class Margin:
    """How far another CPU's kernels may move an output, per unit of its magnitude."""

    atol: float  # times the output's max |value| over the vectors
    rtol: float  # times each element's |value|
    cosine: float  # 1 - min_cosine per vector


# Why these margins. The reference is the bundled model itself, so what is left is how
# another CPU's kernels compute the same graph. Where a second kernel path on the build
# host lands outside the margin, its outputs are kept as an alternate reference
# (``output_bound``): a device then passes within the margin of either.
# - fp32: MLAS (x86 AVX2/AVX-512) and XNNPACK/NEON (ARM) sum in different orders and fuse
#   multiply-adds differently: a few float32 ulps per op. Measured on the build host with
#   ONNX Runtime's fusions on and off: 4e-7 of the output's range on a YOLOv8n detector. 1e-4
#   leaves more than two orders of magnitude (and is the floor older bundles used).
# - fp16 (ARMv8.2 fp16 arithmetic, GPU half precision, and TF32 on CUDA for fp32 models):
#   a 10-bit mantissa is ~5e-4 relative per op, which accumulates over layers: 2e-2.
# - int8: integer sums are exact, but requantization may round an activation the other
#   way (fixed-point on ARM/XNNPACK, float on x86), and one step of a per-tensor scale is
#   ~1/127 of its range; a few such steps reach the output: 5% of the output's range
#   (about 6 steps of an int8 output quantized over it), rtol 5%. x86 AVX2 without VNNI
#   is different: ONNX Runtime's u8s8 kernels saturate 16-bit pair sums (vpmaddubsw),
#   12% of the digits CNN's logit range, 17% of the detector's box range, 15% of MiniLM
#   int8-dynamic's away from exact sums, which is what the alternate reference holds. A
#   Pi 4 (emulated cortex-a72) computes those exact-sum outputs
#   (tests/integration/test_arm64_selftest.py, test_arm64.py).
# A broken runtime (wrong kernels, a corrupted or other model, inputs mixed up) moves
# outputs by a large fraction of their range, beyond each of these.
MARGINS = {
    "fp32": Margin(atol=1e-4, rtol=1e-4, cosine=1e-5),
    "fp16": Margin(atol=2e-2, rtol=2e-2, cosine=1e-3),
    "int8": Margin(atol=5e-2, rtol=5e-2, cosine=5e-3),
}


def margin_for(precision: str, accelerator: str) -> Margin:
    """The margin for a model of ``precision`` run on ``accelerator`` ("none": the CPU).

    A GPU may run fp32 graphs in TF32 or fp16 (TensorRT, cuDNN), so it gets at least
    the fp16 margin.
    """
    if precision.startswith(("int", "uint", "q")):
        key = "int8"
    elif precision in ("fp16", "bf16", "float16"):
        key = "fp16"
    else:
        key = "fp32"
    if accelerator not in ("none", "cpu") and key == "fp32":
        key = "fp16"
    return MARGINS[key]


def round_up(value: float, digits: int = 2) -> float:
    """``value`` rounded up to ``digits`` significant digits (bounds only ever widen)."""
    if value <= 0:
        return value
    scale = 10 ** (digits - 1 - math.floor(math.log10(value)))
    # round() first, so float noise (0.04000000000000036) does not bump the last digit
    return math.ceil(round(value * scale, 6)) / scale


def output_bound(
    reference: np.ndarray, margin: Margin, other: np.ndarray | None = None
) -> SelfTestBound:
    """The bound for one output whose host values over the vectors are ``reference``.

    ``other`` holds the same output computed through a second kernel path on this host
    (``FormatPipeline.kernel_check``: for ONNX, exact integer sums). When it lands
    outside the margin, the vectors keep it as an alternate reference (``alternate``):
    ONNX Runtime's int8 kernels on x86 AVX2 saturate 16-bit pair sums, so an ARM device,
    which sums exactly, computes the second path's outputs, not this host's (12% of the
    digits CNN's logit range apart, 15% of MiniLM's). Either passes; the bound stays the
    margin instead of widening to cover both.
    """
    values = reference.astype(np.float64)
    scale = float(np.max(np.abs(values))) if values.size else 0.0
    # An all-zero output still needs a positive atol; 1e-6 is ~ulps of O(1) values.
    bound = SelfTestBound(
        atol=round_up(max(margin.atol * scale, 1e-6)),
        rtol=margin.rtol,
        min_cosine=round(1.0 - margin.cosine, 9),
        scale=float(f"{scale:.6g}"),
    )
    # A second path that produced NaN or inf tells nothing: the reference alone stands.
    if other is None or not values.size or not np.all(np.isfinite(other)):
        return bound
    other_values = other.astype(np.float64)
    spread = float(np.max(np.abs(other_values - values)))
    within = np.all(np.abs(other_values - values) <= bound.atol + bound.rtol * np.abs(values))
    similar = cosine_rows(other_values, values).min() >= bound.min_cosine
    return bound.model_copy(
        update={"kernel_spread": float(f"{spread:.6g}"), "alternate": not (within and similar)}
    )


def vector_budget(model_bytes: int) -> int:
    """Bytes the vectors may take by default: 10% of the model file, at least 1 MiB."""
    return max(int(BUDGET_FRACTION * model_bytes), BUDGET_FLOOR_BYTES)


def spread(total: int, count: int) -> list[int]:
    """``count`` sample indices spread evenly over ``total`` (first and last included)."""
    count = min(count, total)
    if count <= 1:
        return [0][:count]
    return sorted({round(i * (total - 1) / (count - 1)) for i in range(count)})


def vectors_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """An .npz of ``arrays``, deflated, byte-identical for identical arrays.

    np.load reads deflated members as it reads stored ones, so older runtimes read it.
    """
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        for name in sorted(arrays):
            info = zipfile.ZipInfo(f"{name}.npy", date_time=_FIXED_DATE)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            member = io.BytesIO()
            np.lib.format.write_array(
                member, np.ascontiguousarray(arrays[name]), allow_pickle=False
            )
            zf.writestr(info, member.getvalue(), compresslevel=9)
    return buffer.getvalue()


def _arrays(inputs, outputs, alternates, rows: list[int]) -> dict[str, np.ndarray]:
    arrays = {f"{INPUT_PREFIX}{name}": value[rows] for name, value in inputs.items()}
    arrays.update({f"{REFERENCE_PREFIX}{name}": value[rows] for name, value in outputs.items()})
    arrays.update({f"{ALTERNATE_PREFIX}{name}": value[rows] for name, value in alternates.items()})
    return arrays


@dataclass(frozen=True)
class VectorChoice:
    """The vectors written, their spec, and what the build's progress should say."""

    data: bytes
    spec: SelfTestSpec
    indices: list[int]  # eval samples kept (a stateful model's: feeds, steps in order)
    budget: int
    notes: list[str]


Run = Callable[[dict[str, np.ndarray]], Mapping[str, np.ndarray]]


def feed_rows(feeder: Feeder, arrays: dict[str, np.ndarray], run: Run, count: int):
    """``count`` feeds and ``run``'s outputs on them, each stored one row per feed,
    samples first (``Feeder.input_row``/``output_row``); constants are left out, the
    runtime fills them in. Samples fed one by one are spread over the file; a stateful
    model's feeds are its first steps in order, each with the state ``run`` carried.
    Returns (inputs, outputs, the sample or feed indices)."""
    if feeder.sequential:
        indices = list(range(min(count, feeder.samples(arrays) * feeder.steps(arrays))))
    else:
        indices = spread(feeder.samples(arrays), count)
        arrays = {name: value[indices] for name, value in arrays.items()}
    inputs: dict[str, list[np.ndarray]] = {}
    outputs: dict[str, list[np.ndarray]] = {}
    for _, feed, result in islice(feeder.run(run, arrays), len(indices)):
        for name, value in feed.items():
            if name not in feeder.constants:
                inputs.setdefault(name, []).append(feeder.input_row(name, value))
        for name, value in result.items():
            outputs.setdefault(name, []).append(feeder.output_row(name, value))
    joined = {name: np.concatenate(rows) for name, rows in inputs.items()}
    return joined, {name: np.concatenate(rows) for name, rows in outputs.items()}, indices


def rerun_rows(feeder: Feeder, inputs: dict[str, np.ndarray], run: Run) -> dict[str, np.ndarray]:
    """``run`` on each stored row as the device feeds it (``Feeder.row_feed`` plus the
    constants): one output row per input row."""
    count = len(next(iter(inputs.values())))
    outputs: dict[str, list[np.ndarray]] = {}
    for index in range(count):
        result = run({**feeder.row_feed(inputs, index), **feeder.constants})
        for name, value in result.items():
            outputs.setdefault(name, []).append(feeder.output_row(name, value))
    return {name: np.concatenate(rows) for name, rows in outputs.items()}


def choose_vectors(
    feeder: Feeder,
    arrays: dict[str, np.ndarray],
    run: Run,
    model_bytes: int,
    margin: Margin,
    requested: int | None,
    member: str,
    check: Run | None = None,
) -> VectorChoice:
    """Pick the eval feeds to keep, run the model on them and bound each output.

    ``run`` is the bundled model on this host (one batch-of-one feed in, its outputs
    out); ``check``, when the format has one, the same model through a second kernel
    path, kept as an alternate reference where it lands outside the margin (it counts
    toward the budget). Without ``requested``, as many feeds as
    fit ``vector_budget`` (at most 8, at least 1); an explicit count is honoured, with a
    note when it is above the budget.
    """
    total = feeder.samples(arrays) * (feeder.steps(arrays) if feeder.sequential else 1)
    budget = vector_budget(model_bytes)
    notes: list[str] = []
    wanted = MAX_DEFAULT_VECTORS if requested is None else requested
    if requested is not None and requested > total:
        notes.append(f"--selftest-vectors {requested}: the eval file has {total}; keeping all")
    inputs, outputs, indices = feed_rows(feeder, arrays, run, wanted)
    others = rerun_rows(feeder, inputs, check) if check is not None else {}
    candidates = {
        name: output_bound(value, margin, others.get(name)) for name, value in outputs.items()
    }
    alternates = {name: others[name] for name, bound in candidates.items() if bound.alternate}
    rows = list(range(len(indices)))
    data = vectors_bytes(_arrays(inputs, outputs, alternates, rows))
    # Fewer feeds until they fit: the size per feed depends on how well it deflates.
    while requested is None and len(data) > budget and len(rows) > 1:
        fitting = max(1, min(len(rows) - 1, len(rows) * budget // len(data)))
        rows = spread(len(indices), fitting)
        data = vectors_bytes(_arrays(inputs, outputs, alternates, rows))
    kept = [indices[row] for row in rows]
    if len(data) > budget:
        what = f"{len(kept)} vectors take" if len(kept) > 1 else "one vector takes"
        notes.append(
            f"self-test: {what} {_mib(len(data))}, above the budget of {_mib(budget)} "
            f"(10% of the model, at least 1 MiB)"
            + (
                "; fewer with --selftest-vectors N"
                if len(kept) > 1
                else "; kept anyway, the self-test needs one"
            )
        )
    bounds = {
        name: output_bound(value[rows], margin, others[name][rows] if name in others else None)
        for name, value in sorted(outputs.items())
    }
    # An output kept with an alternate reference says so, even where the kept rows alone
    # would not have needed it.
    bounds = {
        name: bound.model_copy(update={"alternate": name in alternates})
        for name, bound in bounds.items()
    }
    spec = SelfTestSpec(
        path=member,
        count=len(kept),
        atol=max(bound.atol for bound in bounds.values()),
        min_cosine=min(bound.min_cosine for bound in bounds.values()),
        reference="model",
        outputs=bounds,
    )
    return VectorChoice(data, spec, kept, budget, notes)


def _mib(size: int) -> str:
    return f"{size / 2**20:.2f} MiB"


def write_vectors(path: Path, choice: VectorChoice) -> Path:
    path.write_bytes(choice.data)
    return path
