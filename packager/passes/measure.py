"""Measure and GgufMeasure: host figures of the chosen model, from one measuring worker.

Both write a request and run ``packager.measure_worker`` in a fresh process; the model's
format names the function that loads it there (``FormatPipeline.measure.worker_loader``).
The worker reports load time and peak memory the same way for every format (see
``packager.measure_worker`` and docs/profiles.md); the pass adds the host's description.
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

from pydantic import Field

from edge_runtime.cpus import usable_cpus

from ..data import save_npz_deterministic
from ..formats import formats, get_format
from ..speed import host_threads
from .base import ModelArtifact, Pass, PassConfig, PassContext, PassFailedError, PassOutput


def run_worker(out_dir: Path, request: dict[str, Any]) -> dict[str, Any]:
    """Run the measuring worker on ``request``; its figures plus this host's description.

    A fresh process keeps peak-memory figures free of the packager's own allocations.
    """
    request_path = out_dir / "request.json"
    request_path.write_text(json.dumps(request), encoding="utf-8")
    done = subprocess.run(
        [sys.executable, "-m", "packager.measure_worker", str(request_path)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise PassFailedError(f"measuring failed: {done.stderr.strip()[-2000:]}")
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    figures["host"] = host_description()
    return figures


def host_description() -> str:
    """This host as the figures were taken on it, e.g. "x86_64 16 cores, 2 usable
    (affinity)": a build limited to fewer CPUs than the host has times with fewer."""
    cpus = usable_cpus()
    usable = f", {cpus.count} usable ({cpus.reason})" if cpus.restricted else ""
    host = f"{platform.machine()} {platform.processor() or ''} {cpus.cores} cores{usable}"
    return " ".join(host.split())


class MeasureConfig(PassConfig):
    runs: int = Field(50, ge=50, description="timed runs (at least 50 for a stable p95)")
    warmup: int = Field(5, ge=0, description="untimed runs first")


class Measure(Pass):
    """Times a tensor model at batch 1 on the first eval sample, in a fresh process."""

    name = "Measure"
    Config = MeasureConfig
    # The formats whose pipeline measures with this pass (the tensor formats).
    input_formats = frozenset(
        n for n, p in formats().items() if p.measure.step.pass_name == "Measure"
    )

    def _run(self, model: ModelArtifact, out_dir: Path, ctx: PassContext) -> PassOutput:
        pipeline = get_format(model.format)
        inputs = out_dir / "inputs.npz"
        # The first eval sample as the model takes it (batch axes, constants, state).
        save_npz_deterministic(inputs, ctx.eval_sets[0].first_feed())
        spec = pipeline.backend_spec(ctx.profile)  # as the device will run it
        request = {
            "loader": pipeline.measure.worker_loader,
            "model": str(model.path),
            "inputs": str(inputs),
            "backend": spec.model_dump(mode="json"),
            "threads": host_threads(spec.intra_op_threads),
            "runs": self.config.runs,
            "warmup": self.config.warmup,
        }
        return PassOutput(model, run_worker(out_dir, request))


class GgufMeasureConfig(PassConfig):
    pp_tokens: int = Field(512, ge=16, description="prompt tokens per pp run (llama-bench pp512)")
    tg_tokens: int = Field(128, ge=8, description="generated tokens per tg run (tg128)")
    repetitions: int = Field(3, ge=1, description="runs of each; the mean is reported")


class GgufMeasure(Pass):
    """llama-bench style pp/tg tokens per second and peak memory, in a fresh process."""

    name = "GgufMeasure"
    Config = GgufMeasureConfig
    input_formats = frozenset({"gguf"})

    def _run(self, model: ModelArtifact, out_dir: Path, ctx: PassContext) -> PassOutput:
        request = {
            "loader": get_format(model.format).measure.worker_loader,
            "model": str(model.path),
            "threads": host_threads(ctx.profile.gguf.threads or ctx.profile.cores),
            "pp_tokens": self.config.pp_tokens,
            "tg_tokens": self.config.tg_tokens,
            "repetitions": self.config.repetitions,
        }
        return PassOutput(model, run_worker(out_dir, request))
