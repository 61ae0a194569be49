"""Self-test vectors: compare what this device computes with the fp32 reference."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .manifest import Manifest, TokenSelfTestSpec

INPUT_PREFIX = "input."
REFERENCE_PREFIX = "reference."


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


def load_vectors(path: Path) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    with np.load(path, allow_pickle=False) as data:
        inputs = {k[len(INPUT_PREFIX) :]: data[k] for k in data.files if k.startswith(INPUT_PREFIX)}
        refs = {
            k[len(REFERENCE_PREFIX) :]: data[k]
            for k in data.files
            if k.startswith(REFERENCE_PREFIX)
        }
    return inputs, refs


def run_selftest(runtime, model_dir: Path, manifest: Manifest) -> SelfTestReport:
    """Run every vector one sample at a time and compare with the stored fp32 reference."""
    spec = manifest.selftest
    if spec.kind == "greedy-tokens":
        return run_token_selftest(runtime.backend, spec)
    inputs, references = load_vectors(model_dir / spec.path)
    failures: list[str] = []
    worst_abs, worst_cos = 0.0, 1.0
    # Vectors are stored samples first; the feeder puts each input's batch axis where the
    # model has it (and takes it back out of the outputs). Constant inputs are not stored.
    feeder = runtime.feeder
    for index in range(spec.count):
        outputs = runtime.run(feeder.row_feed(inputs, index))
        for name, reference in references.items():
            actual = feeder.output_row(name, outputs[name]).astype(np.float64)
            expected = reference[index : index + 1].astype(np.float64)
            abs_error = float(np.max(np.abs(actual - expected))) if actual.size else 0.0
            cosine = float(cosine_rows(actual, expected).min())
            worst_abs, worst_cos = max(worst_abs, abs_error), min(worst_cos, cosine)
            if abs_error > spec.atol or cosine < spec.min_cosine:
                failures.append(
                    f"vector {index} output {name}: max abs error {abs_error:.3g} "
                    f"(allowed {spec.atol:.3g}), cosine {cosine:.6f} (needs {spec.min_cosine:.6f})"
                )
    return SelfTestReport(
        passed=not failures,
        vectors=spec.count,
        max_abs_error=worst_abs,
        min_cosine=worst_cos,
        atol=spec.atol,
        required_cosine=spec.min_cosine,
        failures=failures,
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
