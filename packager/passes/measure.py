"""Measure: latency percentiles, peak memory and load time on this host."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

from pydantic import Field

from ..data import sample
from ..examples.data_io import save_npz_deterministic
from .base import ModelArtifact, Pass, PassConfig, PassContext, PassFailedError, PassOutput


class MeasureConfig(PassConfig):
    runs: int = Field(50, ge=50, description="timed runs (at least 50 for a stable p95)")
    warmup: int = Field(5, ge=0, description="untimed runs first")


class Measure(Pass):
    """Times the model at batch 1 on the first eval sample, in a fresh process."""

    name = "Measure"
    Config = MeasureConfig
    input_formats = frozenset({"onnx", "tflite"})

    def _run(self, model: ModelArtifact, out_dir: Path, ctx: PassContext) -> PassOutput:
        inputs = out_dir / "inputs.npz"
        save_npz_deterministic(inputs, sample(ctx.evaluation, 0))
        host_cores = os.cpu_count() or 1
        profile = ctx.profile
        threads = profile.tflite.threads if model.format == "tflite" else profile.onnx.threads
        request = {
            "model": str(model.path),
            "format": model.format,
            "inputs": str(inputs),
            "threads": min(threads or host_cores, host_cores),
            "xnnpack": profile.tflite.xnnpack,
            "cpu_mem_arena": profile.onnx.cpu_mem_arena,
            "allow_spinning": profile.onnx.allow_spinning,
            # The host has no GPU provider to speak of; CPU figures are what it can measure.
            "providers": ["CPUExecutionProvider"],
            "runs": self.config.runs,
            "warmup": self.config.warmup,
        }
        request_path = out_dir / "request.json"
        request_path.write_text(json.dumps(request), encoding="utf-8")
        return PassOutput(model, run_worker("packager.measure_worker", str(request_path)))


def run_worker(module: str, argument: str) -> dict:
    """Run a measuring worker in a fresh process; its figures plus this host's description.

    A fresh process keeps peak-memory figures free of the packager's own allocations.
    """
    done = subprocess.run(
        [sys.executable, "-m", module, argument], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise PassFailedError(f"measuring failed: {done.stderr.strip()[-2000:]}")
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    host = f"{platform.machine()} {platform.processor() or ''} {os.cpu_count() or 1} cores"
    figures["host"] = " ".join(host.split())
    return figures
