"""Self-test vectors: compare what this device computes with the build host's reference.

Newer bundles store the bundled model's own outputs on the build host and a bound per
output (``SelfTestSpec.outputs``); older ones the fp32 source's outputs and one ``atol``
and ``min_cosine`` for all outputs. ``SelfTestSpec.bound`` gives the one that applies.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import BundleError
from .manifest import Manifest, SelfTestBound, TokenSelfTestSpec
from .npz_file import read_npz

INPUT_PREFIX = "input."
REFERENCE_PREFIX = "reference."
# The same output through the build host's second kernel path (exact integer sums): a
# device whose CPU sums exactly lands here rather than on an x86 AVX2 host's reference.
ALTERNATE_PREFIX = "alternate."


@dataclass(frozen=True)
class SelfTestReport:
    """Outcome of running every self-test vector."""

    passed: bool
    vectors: int
    max_abs_error: float
    min_cosine: float
    atol: float
    required_cosine: float
    failures: list[str] = field(default_factory=list)
    # Language models: greedy tokens that matched the build host's, of those recorded.
    matched_tokens: int | None = None
    expected_tokens: int | None = None


def cosine_rows(actual: np.ndarray, expected: np.ndarray) -> np.ndarray:
    """Cosine similarity per sample (first axis), flattening the rest."""
    a = actual.reshape(len(actual), -1).astype(np.float64)
    b = expected.reshape(len(expected), -1).astype(np.float64)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    dots = (a * b).sum(axis=1)
    # Two all-zero rows are identical, not undefined.
    return np.where(norms > 0, dots / np.where(norms > 0, norms, 1), 1.0)


def read_vectors(path: Path) -> dict[str, np.ndarray]:
    """Every array of a bundle's vectors file, each header checked before it is read.

    Raises:
        BundleError: the file is truncated, crafted, or holds pickled objects.
    """
    return read_npz(path, BundleError, label=f"the bundle's self-test vectors {path.name}")


def _with_prefix(arrays: dict[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    return {k[len(prefix) :]: value for k, value in arrays.items() if k.startswith(prefix)}


def load_vectors(path: Path) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The vectors' inputs and reference outputs, by tensor name."""
    arrays = read_vectors(path)
    return _with_prefix(arrays, INPUT_PREFIX), _with_prefix(arrays, REFERENCE_PREFIX)


def load_alternates(path: Path) -> dict[str, np.ndarray]:
    """The outputs stored from the build host's second kernel path (none in older bundles)."""
    return _with_prefix(read_vectors(path), ALTERNATE_PREFIX)


def vector_problems(
    manifest: Manifest, inputs: dict[str, np.ndarray], references: dict[str, np.ndarray], feeder
) -> list[str]:
    """Why the stored vectors cannot test the model (none: they can).

    A self-test that compares nothing must fail, not pass: no reference outputs, an
    output the model does not have, or fewer stored rows than the manifest's ``count``.
    """
    spec = manifest.selftest
    problems = []
    if not references:
        problems.append(
            f"{spec.path} holds no reference outputs ({REFERENCE_PREFIX}NAME), so nothing "
            "would be compared; the bundle was built wrong, rebuild it"
        )
    outputs = {output.name for output in manifest.outputs}
    if unknown := sorted(set(references) - outputs):
        problems.append(f"{spec.path} holds references for outputs {unknown} the model lacks")
    if missing := sorted(set(feeder.data_inputs) - set(inputs)):
        problems.append(f"{spec.path} lacks the inputs {missing}")
    if unknown := sorted(set(inputs) - {tensor.name for tensor in manifest.inputs}):
        problems.append(f"{spec.path} holds inputs {unknown} the model lacks")
    for kind, arrays in (("input", inputs), ("reference", references)):
        for name, value in arrays.items():
            rows = value.shape[0] if value.ndim else 0
            if rows < spec.count:
                problems.append(
                    f"{kind} {name!r} holds {rows} vectors; the manifest says {spec.count}"
                )
    return problems


def run_selftest(runtime, model_dir: Path, manifest: Manifest) -> SelfTestReport:
    """Run every vector one sample at a time and compare with the stored reference.

    Raises:
        BundleError: the vectors file is truncated, crafted, or holds pickled objects.
    """
    spec = manifest.selftest
    if spec.kind == "greedy-tokens":
        return run_token_selftest(runtime.backend, spec)
    arrays = read_vectors(model_dir / spec.path)
    inputs = _with_prefix(arrays, INPUT_PREFIX)
    references = _with_prefix(arrays, REFERENCE_PREFIX)
    alternates = _with_prefix(arrays, ALTERNATE_PREFIX)
    # Vectors are stored samples first; the feeder puts each input's batch axis where the
    # model has it (and takes it back out of the outputs). Constant inputs are not stored.
    feeder = runtime.feeder
    failures = vector_problems(manifest, inputs, references, feeder)
    if failures:
        return SelfTestReport(
            passed=False,
            vectors=0,
            max_abs_error=0.0,
            min_cosine=1.0,
            atol=spec.atol,
            required_cosine=spec.min_cosine,
            failures=failures,
        )
    worst_abs, worst_cos = 0.0, 1.0
    for index in range(spec.count):
        outputs = runtime.run(feeder.row_feed(inputs, index))
        for name, reference in references.items():
            actual = feeder.output_row(name, outputs[name]).astype(np.float64)
            expected = reference[index : index + 1].astype(np.float64)
            other = alternates[name][index : index + 1] if name in alternates else None
            check = check_output(actual, expected, spec.bound(name), other)
            worst_abs, worst_cos = max(worst_abs, check.abs_error), min(worst_cos, check.cosine)
            if check.failure is not None:
                failures.append(f"vector {index} output {name}: {check.failure}")
    return SelfTestReport(
        passed=not failures,
        vectors=spec.count,
        max_abs_error=worst_abs,
        min_cosine=worst_cos,
        atol=spec.atol,
        required_cosine=spec.min_cosine,
        failures=failures,
    )


@dataclass(frozen=True)
class OutputCheck:
    """One output of one vector against its bound."""

    abs_error: float  # the largest |actual - expected|
    cosine: float
    failure: str | None  # why it failed; None: within the bound

    def also(self, alternate: OutputCheck) -> OutputCheck:
        """This failed check, with why it failed against the alternate reference too."""
        return OutputCheck(
            self.abs_error,
            self.cosine,
            f"{self.failure}; against the second kernel path's reference: {alternate.failure}",
        )


def check_output(
    actual: np.ndarray,
    expected: np.ndarray,
    bound: SelfTestBound,
    alternate: np.ndarray | None = None,
) -> OutputCheck:
    """One vector's output against its reference, or (``bound.alternate``) against the
    alternate reference when the first fails: this CPU may compute as the build host's
    second kernel path did (exact integer sums, where an x86 AVX2 host saturates)."""
    check = compare_output(actual, expected, bound)
    if check.failure is None or alternate is None or not bound.alternate:
        return check
    second = compare_output(actual, alternate.astype(np.float64), bound)
    return second if second.failure is None else check.also(second)


def compare_output(actual: np.ndarray, expected: np.ndarray, bound: SelfTestBound) -> OutputCheck:
    """Check ``actual`` against ``expected`` (same shape, one vector) within ``bound``.

    Each element may differ by ``atol + rtol * |expected|``: the absolute part covers
    values near zero, the relative part large values, whose rounding grows with them.
    """
    if actual.shape != expected.shape:
        return OutputCheck(
            math.inf, -1.0, f"shape {list(actual.shape)}, expected {list(expected.shape)}"
        )
    if not actual.size:
        return OutputCheck(0.0, 1.0, None)
    difference = np.abs(actual - expected)
    allowed = bound.atol + bound.rtol * np.abs(expected)
    # NaN compares False everywhere: a NaN output must fail, so test for "within" instead.
    within = bool(np.all(difference <= allowed))
    abs_error = float(np.max(difference)) if not np.isnan(difference).any() else math.inf
    cosine = float(cosine_rows(actual, expected).min())
    if within and cosine >= bound.min_cosine:
        return OutputCheck(abs_error, cosine, None)
    worst = int(np.argmax(np.where(np.isnan(difference), np.inf, difference / allowed)))
    return OutputCheck(
        abs_error,
        cosine,
        f"max abs error {abs_error:.3g} (at element {worst}: {actual.flat[worst]:.4g} vs "
        f"{expected.flat[worst]:.4g}, allowed {allowed.flat[worst]:.3g} = atol "
        f"{bound.atol:.3g} + rtol {bound.rtol:g} x |reference|), cosine {cosine:.6f} "
        f"(needs {bound.min_cosine:.6f})",
    )


def compare_tokens(spec: TokenSelfTestSpec, actual: list[int]) -> tuple[int, str | None]:
    """How many leading tokens match, and why the comparison failed (None: it passed).

    A mismatch where the build host's top-1/top-2 logit gap was under ``tie_margin`` is
    a near-tie that another CPU's kernels may flip: the comparison ends there, passed.
    """
    for index, expected in enumerate(spec.tokens):
        got = actual[index] if index < len(actual) else None
        if got == expected:
            continue
        if spec.margins[index] < spec.tie_margin:
            return index, None
        return index, (
            f"token {index}: expected {expected}, got {got} (the build host chose it by a "
            f"logit margin of {spec.margins[index]:.3g}, above the near-tie limit "
            f"{spec.tie_margin:g}); the model file or the engine computes differently here"
        )
    return len(spec.tokens), None


def run_token_selftest(backend, spec: TokenSelfTestSpec) -> SelfTestReport:
    """Greedy-decode the recorded prompt and compare with the build host's tokens."""
    actual, _ = backend.greedy_tokens(spec.prompt, len(spec.tokens))
    matched, failure = compare_tokens(spec, actual)
    return SelfTestReport(
        passed=failure is None,
        vectors=1,
        max_abs_error=0.0,
        min_cosine=1.0,
        atol=0.0,
        required_cosine=1.0,
        failures=[failure] if failure else [],
        matched_tokens=matched,
        expected_tokens=len(spec.tokens),
    )
