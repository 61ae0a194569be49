"""Reading a bundle's manifest for display, without a key."""

from __future__ import annotations

import tarfile
from pathlib import Path

from edge_runtime.errors import BundleError
from edge_runtime.manifest import MANIFEST_NAME, MAX_MANIFEST_BYTES, Manifest, parse_manifest


def read_manifest_unverified(bundle: Path) -> Manifest:
    """The manifest of ``bundle``, parsed but NOT signature-checked (display only)."""
    try:
        with tarfile.open(bundle, mode="r:") as archive:
            info = archive.getmember(MANIFEST_NAME)
            if not info.isreg() or info.size > MAX_MANIFEST_BYTES:
                raise BundleError(f"{bundle}: {MANIFEST_NAME} is not a plain, small file")
            handle = archive.extractfile(info)
            return parse_manifest(handle.read() if handle else b"")
    except FileNotFoundError:
        raise BundleError(f"bundle {bundle} does not exist") from None
    except KeyError:
        raise BundleError(
            f"{bundle} has no {MANIFEST_NAME}; it is not an edgepack bundle"
        ) from None
    except tarfile.TarError as exc:
        raise BundleError(f"{bundle} is not a readable .edgepkg archive: {exc}") from None


def _backend_line(manifest: Manifest) -> str:
    backend = manifest.backend
    if backend.name == "tflite":
        return f"backend    tflite: {backend.tflite_settings()}"
    return (
        f"backend    {backend.name} ({' > '.join(backend.providers)}), "
        f"{backend.intra_op_threads} threads, "
        f"arena {'on' if backend.enable_cpu_mem_arena else 'off'}"
    )


def summary(manifest: Manifest) -> str:
    """Readable multi-line summary (rich markup; user strings are escaped)."""
    from rich.markup import escape

    q = manifest.quantization
    lines = [
        f"[bold]{escape(manifest.name)}[/bold] {escape(manifest.version)}  id {manifest.bundle_id}",
        f"created    {manifest.created}",
        f"target     {manifest.target.profile}: {manifest.target.arch}, accelerator "
        f"{manifest.target.accelerator}, wheels {manifest.target.platform_tag}",
        _backend_line(manifest),
        f"model      {manifest.model.path}: {manifest.model.recipe} ({manifest.model.precision}), "
        + (
            f"signature {manifest.model.signature}"
            if manifest.model.format == "tflite"
            else f"opset {manifest.model.opset}"
        ),
        f"inputs     {manifest.signature_text(manifest.inputs)}",
        f"outputs    {manifest.signature_text(manifest.outputs)}",
        f"gate       {q.gate_metric} <= {q.max_degradation} on {q.eval_samples} samples; "
        + ", ".join(f"{a.recipe} {a.status}" for a in q.attempts),
        f"memory     {manifest.memory.required_mb} MB ({manifest.memory.basis}) of "
        f"{manifest.memory.budget_mb:.0f} MB",
    ]
    if manifest.measurements:
        m = manifest.measurements
        lines.append(
            f"measured   p50 {m.latency_ms_p50:.3g} ms, p95 {m.latency_ms_p95:.3g} ms, "
            f"peak {m.peak_memory_mb:.1f} MB on {m.host}"
        )
    lines.append(
        f"self-test  {manifest.selftest.count} vectors, atol {manifest.selftest.atol}, "
        f"min cosine {manifest.selftest.min_cosine}"
    )
    for entry in manifest.files:
        lines.append(f"file       {entry.path} {entry.size} bytes sha256 {entry.sha256[:16]}...")
    lines.append("tools      " + ", ".join(f"{k} {v}" for k, v in sorted(manifest.tools.items())))
    return "\n".join(lines[:1] + [escape(line) for line in lines[1:]])
