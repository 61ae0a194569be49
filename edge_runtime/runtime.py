"""``Runtime``: the one facade an application on the device calls."""

from __future__ import annotations

import logging
import shutil
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Any, Protocol

import numpy as np

from .backends import (
    BackendOptions,
    GenerativeBackend,
    TensorBackend,
    TokenStream,
    create_backend,
    interface_for,
)
from .bundle import VerifiedBundle, extract_into, verify_bundle
from .cpus import ThreadChoice
from .errors import BackendError, BundleError, InputSignatureError
from .feeding import Feeder
from .manifest import Manifest, TensorSpec, TextSpec
from .selftest import SelfTestReport, run_selftest
from .text import TextBatch, TextEncoder, chunks, pool

log = logging.getLogger(__name__)
_clock = time.perf_counter

RUN_ON_LANGUAGE_MODEL = (
    "this bundle holds a language model: call generate(prompt) or chat(messages), "
    "or `edge-runtime generate BUNDLE PROMPT`"
)


class TelemetryHook(Protocol):
    """What ``Runtime`` reports to; ``edge_runtime.telemetry.client.TelemetryClient`` is one."""

    def record(
        self, seconds: float, ok: bool = True, tokens: int = 0, error: str | None = None
    ) -> None: ...

    def bundle_loaded(self, facts: dict[str, Any], signed_by: str) -> None: ...

    def event(self, name: str, level: str = "info", **data: Any) -> int: ...


class Runtime:
    """A verified, loaded bundle, ready to run inference offline.

    Use ``Runtime.open`` rather than the constructor. A Runtime is a context manager;
    closing it releases the engine and removes a temporary extraction folder.

    Attributes:
        manifest: the verified manifest of the loaded bundle.
        metadata: a read-only mapping of the model's own metadata, as its file carries it:
            an ONNX model's ``metadata_props`` (name -> str), a TFLite model's metadata
            entries (name -> str where the bytes are UTF-8 text, else bytes), a GGUF
            model's ``general.*`` and ``tokenizer.*`` strings and numbers. Empty when the
            model has none. Models keep things there such as an OCR character dictionary.
        model_dir: the folder the bundle was extracted into.
        feeder: how the model is fed (``edge_runtime.feeding.Feeder``): its constant
            inputs, the inputs whose batch axis is not 0, and the state a stateful model
            carries from step to step, as the build recorded them.
    """

    def __init__(
        self,
        verified: VerifiedBundle,
        model_dir: Path,
        backend: TensorBackend | GenerativeBackend,
        owns_dir: bool,
        telemetry: TelemetryHook | None = None,
    ) -> None:
        self._verified = verified
        self.model_dir = model_dir
        self._backend = backend
        self._owns_dir = owns_dir
        # Decided once, from the manifest: the backend implements exactly one of the two.
        interface = interface_for(verified.manifest)
        if not isinstance(backend, interface):
            raise BackendError(
                f"bundle {verified.manifest.name!r} needs a {interface.__name__}, "
                f"not {type(backend).__name__}"
            )
        self._tensors = backend if interface is TensorBackend else None
        self._text = backend if interface is GenerativeBackend else None
        self._check_inputs = InputChecker(verified.manifest.inputs)
        manifest = verified.manifest
        try:
            self.feeder = Feeder(manifest.inputs, manifest.outputs, manifest.feeding)
        except (ValueError, TypeError, OverflowError) as exc:  # a constant the dtype refuses
            raise BundleError(
                f"the manifest's feeding constants do not fit their inputs ({exc}); "
                "rebuild the bundle"
            ) from None
        self._constants = self.feeder.constants
        self._metadata: Mapping[str, Any] | None = None
        self._encoder: TextEncoder | None = None
        self._encoder_lock = threading.Lock()
        self._telemetry: TelemetryHook | None = None
        self.telemetry = telemetry

    @property
    def telemetry(self) -> TelemetryHook | None:
        """Where inference outcomes are reported; assign a hook (or None) at any time."""
        return self._telemetry

    @telemetry.setter
    def telemetry(self, hook: TelemetryHook | None) -> None:
        self._telemetry = hook
        if hook is not None:
            hook.bundle_loaded(self.bundle_facts(), self._verified.key_id)

    @classmethod
    def open(
        cls,
        bundle: str | Path,
        pubkey: str | Path | None = None,
        *,
        extract_dir: str | Path | None = None,
        providers: list[str] | None = None,
        threads: int | None = None,
        gpu_layers: int | None = None,
        context_length: int | None = None,
        telemetry: TelemetryHook | None = None,
    ) -> Runtime:
        """Verify a bundle, extract it and load its model.

        Args:
            bundle: path of the ``.edgepkg`` file.
            pubkey: PEM Ed25519 public key. None uses ``$EDGEPACK_TRUSTED_KEYS``.
            extract_dir: an empty folder to extract into (created if needed); None uses a
                temporary folder that is removed on ``close``. When opening fails, what
                was extracted into it is removed again.
            providers: ONNX Runtime providers to use instead of the manifest's list.
            threads: thread count instead of the manifest's, used as given. Without it
                the manifest's count is capped at the CPUs this process may use (its
                affinity and cgroup CPU quota; see ``threads_used``).
            gpu_layers: llama.cpp layers to offload to the GPU instead of the manifest's
                (-1 = all, 0 = CPU only); language-model bundles only.
            context_length: llama.cpp context length instead of the manifest's.
            telemetry: receives every inference's latency and outcome, and the bundle
                facts (e.g. a started ``TelemetryClient``); None reports nothing.

        Returns:
            The loaded runtime.

        Raises:
            BundleError: the bundle is tampered with, malformed or unsafe.
            SignatureError: the signature does not verify with the key.
            TrustError: no key given and none trusted.
            BackendError: the engine for the bundle is missing or cannot load it.
        """
        verified = verify_bundle(Path(bundle), Path(pubkey) if pubkey else None)
        manifest = verified.manifest
        log.info(
            "verified %s: signed by %s, %d files match their sha256",
            bundle,
            verified.key_id,
            len(manifest.files),
        )
        owns_dir = extract_dir is None
        target = Path(tempfile.mkdtemp(prefix="edgepack-")) if owns_dir else Path(extract_dir)
        extraction = None
        backend = None
        try:
            extraction = extract_into(verified, target)
            backend = create_backend(manifest.backend.name, interface_for(manifest))
            backend.load(
                extraction.root,
                manifest,
                BackendOptions(providers, threads, gpu_layers, context_length),
            )
            log.info("loaded %s (%s) with %s", manifest.name, manifest.model.recipe, backend.info())
            return cls(verified, extraction.root, backend, owns_dir, telemetry)
        except BaseException:
            if backend is not None:
                backend.close()
            # Leave the caller's folder as it was: what this call extracted goes too.
            if owns_dir:
                shutil.rmtree(target, ignore_errors=True)
            elif extraction is not None:
                extraction.remove()
            raise

    @property
    def manifest(self) -> Manifest:
        """The verified manifest of the loaded bundle."""
        return self._verified.manifest

    @property
    def backend(self) -> TensorBackend | GenerativeBackend:
        """The loaded backend; ``runtime.backend.engine`` is the engine object itself."""
        return self._backend

    @property
    def threads_used(self) -> ThreadChoice | None:
        """How many threads the engine got and why: the profile's figure, an explicit
        ``threads``, and the CPUs this process may use. None for a backend that does not
        say."""
        return self._backend.thread_choice

    @property
    def metadata(self) -> Mapping[str, Any]:
        """The model's own metadata, read-only (see the class docstring for each format)."""
        if self._metadata is None:
            self._metadata = MappingProxyType(dict(self._backend.metadata()))
        return self._metadata

    @property
    def signed_by(self) -> str:
        """Key id (sha256 prefix) of the key that signed the bundle."""
        return self._verified.key_id

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one inference.

        Args:
            inputs: one numpy array per model input, by name, matching the manifest's
                dtypes and shapes (named dimensions may take any size, consistently).
                A constant input the build recorded (``--constant``) may be left out:
                its recorded value is filled in.

        Returns:
            Output arrays by name.

        Raises:
            InputSignatureError: a missing or extra name, or a wrong dtype, rank or shape;
                the message names the expected signature.
            BackendError: the bundle holds a language model (use ``generate``).
        """
        backend = self._tensors
        if backend is None:
            raise BackendError(RUN_ON_LANGUAGE_MODEL)
        if self._constants:
            inputs = self._with_constants(inputs)
        telemetry = self._telemetry
        if telemetry is None:
            self._check_inputs(inputs)
            # Backends only read the dict; copy other mappings into one.
            return backend.run(inputs if type(inputs) is dict else dict(inputs))
        started = _clock()
        try:
            self._check_inputs(inputs)
            outputs = backend.run(dict(inputs))
        except Exception as exc:
            telemetry.record(_clock() - started, False, error=f"{exc}"[:500])
            raise
        telemetry.record(_clock() - started)
        return outputs

    def _with_constants(self, inputs: Mapping[str, np.ndarray]) -> Mapping[str, np.ndarray]:
        """``inputs`` plus the recorded value of each constant input the caller left out."""
        if not isinstance(inputs, Mapping):
            return inputs  # the input check says what is wrong
        missing = [name for name in self._constants if name not in inputs]
        if not missing:
            return inputs
        return {**inputs, **{name: self._constants[name] for name in missing}}

    def tokenize(self, texts: Sequence[str]) -> TextBatch:
        """Text to the model's inputs with the bundle's own tokenizer (``edgepack build
        --tokenizer``), padded and truncated as its manifest's ``text`` section says.

        Args:
            texts: one or more strings.

        Returns:
            A ``TextBatch``: ``feeds`` for ``run``, the ``attention_mask`` and each text's
            token count (``lengths``; ``tokens`` is their sum).

        Raises:
            BackendError: the bundle carries no tokenizer, or the tokenizers library is
                missing.
            InputSignatureError: not a list of strings, or a text longer than the model
                takes when the bundle does not truncate.
        """
        encoder = self._encoder
        if encoder is None:
            spec = self._text_spec()
            with self._encoder_lock:
                if self._encoder is None:
                    path = self.model_dir / spec.tokenizer
                    self._encoder = TextEncoder(path, spec, self.manifest.inputs)
                encoder = self._encoder
        return encoder.encode(texts)

    def embed(self, texts: Sequence[str] | TextBatch) -> np.ndarray:
        """Embeddings of ``texts`` from a bundle built with ``--tokenizer`` for the
        ``embedding`` task: the model's output pooled as the manifest says (the mean over
        the attention mask, the first token, or the model's own pooled output), then
        L2-normalised.

        Args:
            texts: strings, or a ``TextBatch`` from ``tokenize`` (to know its token
                count). Long lists run in pieces of ``edge_runtime.text.EMBED_CHUNK``.

        Returns:
            float32 array [len(texts), dim]; each row has unit length.

        Raises:
            BackendError: the bundle carries no tokenizer or is not an embedding model.
            InputSignatureError: as ``tokenize``.
        """
        spec = self._text_spec()
        if spec.task != "embedding":
            raise BackendError(
                f"bundle {self.manifest.name!r} is a text {spec.task} model, not an embedding "
                "model: tokenize(texts) and run(batch.feeds) give its scores"
            )
        batch = texts if isinstance(texts, TextBatch) else self.tokenize(texts)
        ids = next(t for t in self.manifest.inputs if t.name == spec.inputs["input_ids"])
        fixed = ids.shape[0] if ids.shape and isinstance(ids.shape[0], int) else None
        vectors = []
        for piece, count in chunks(batch, spec, fixed):
            outputs = self.run(piece.feeds)
            vectors.append(pool(outputs[spec.output], piece.attention_mask, spec)[:count])
        return np.concatenate(vectors)

    def _text_spec(self) -> TextSpec:
        spec = self.manifest.text
        if spec is None:
            raise BackendError(
                f"bundle {self.manifest.name!r} carries no tokenizer, so it takes tensors, "
                "not text; rebuild it with `edgepack build ... --tokenizer tokenizer.json`"
            )
        return spec

    def generate(
        self,
        prompt: str,
        *,
        max_tokens: int = 256,
        temperature: float = 0.7,
        top_p: float = 0.95,
        top_k: int = 40,
        seed: int | None = None,
        stop: list[str] | None = None,
    ) -> TokenStream:
        """Stream a completion of ``prompt`` from a language-model bundle.

        Args:
            prompt: plain text; the model's BOS token is added when the model wants one.
            max_tokens: most tokens to generate (fewer if the context fills up).
            temperature: 0 is greedy (deterministic); higher is more random.
            top_p: nucleus sampling mass.
            top_k: sample among this many most likely tokens.
            seed: sampling seed, for repeatable output at temperature > 0.
            stop: strings that end the completion; they are not included in it.

        Returns:
            A ``TokenStream``: iterate it for text pieces as they are generated, or call
            ``read()``; ``finish_reason`` and ``completion_tokens`` are set at the end.

        Raises:
            BackendError: the bundle is not a language model.
            ValueError: a bad argument, or a prompt longer than the context.
        """
        stream = self._generator().generate(
            prompt,
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            seed=seed,
            stop=stop or (),
        )
        return self._reported(stream)

    def chat(self, messages: list[dict[str, str]], **options: Any) -> TokenStream:
        """Like ``generate``, for ``[{"role": "user", "content": "..."}, ...]`` messages,
        formatted with the model's own chat template from its GGUF metadata.

        Raises:
            BackendError: the bundle is not a language model, or it has no chat template.
            ValueError: a malformed message.
        """
        return self._reported(self._generator().chat(messages, **options))

    def _generator(self) -> GenerativeBackend:
        if self._text is None:
            raise BackendError(
                f"bundle {self.manifest.name!r} holds an {self.manifest.model.format.upper()} "
                "model, not a language model; use run(inputs)"
            )
        return self._text

    def _reported(self, stream: TokenStream) -> TokenStream:
        """Have telemetry see the stream's duration and token count when it ends."""
        telemetry = self._telemetry
        if telemetry is not None:

            def report(stream: TokenStream, seconds: float, error: Exception | None) -> None:
                error_text = None if error is None else f"{error}"[:500]
                telemetry.record(seconds, error is None, stream.completion_tokens, error_text)

            stream.add_done_callback(report)
        return stream

    def selftest(self) -> SelfTestReport:
        """Run the bundle's self-test vectors against their stored reference outputs."""
        report = run_selftest(self, self.model_dir, self.manifest)
        if self._telemetry is not None:
            self._telemetry.event(
                "selftest",
                "info" if report.passed else "error",
                passed=report.passed,
                vectors=report.vectors,
                max_abs_error=report.max_abs_error,
                min_cosine=report.min_cosine,
                failures=report.failures[:5],
            )
        return report

    def bundle_facts(self) -> dict[str, str]:
        """The bundle's identity, as telemetry reports it in ``birth``."""
        manifest = self.manifest
        return {
            "id": manifest.bundle_id,
            "name": manifest.name,
            "version": manifest.version,
            "profile": manifest.target.profile,
            "backend": manifest.backend.name,
            "recipe": manifest.model.recipe,
        }

    def info(self) -> dict[str, Any]:
        """Manifest summary plus what the engine actually uses on this device (its
        ``threads``, and the profile's figure and usable CPUs behind them)."""
        facts = self.bundle_facts()
        choice = self.threads_used
        return {
            "bundle_id": facts.pop("id"),
            **facts,
            "signed_by": self.signed_by,
            **self._backend.info(),
            **(choice.as_dict() if choice is not None else {}),
        }

    def close(self) -> None:
        """Release the engine and remove the temporary extraction folder, if any."""
        self._backend.close()
        if self._owns_dir:
            shutil.rmtree(self.model_dir, ignore_errors=True)

    def __enter__(self) -> Runtime:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


# ONNX writes '?' (or nothing) for an axis of unknown size: free on its own, never shared.
UNSHARED_DIMS = frozenset({"?", ""})


def check_inputs(specs: list[TensorSpec], inputs: Mapping[str, Any]) -> None:
    """Raise InputSignatureError unless ``inputs`` match ``specs`` exactly."""
    try:
        _check_inputs(specs, inputs)
    except _Mismatch as mismatch:
        expected = "expected " + ", ".join(spec.describe() for spec in specs)
        raise InputSignatureError(f"{mismatch}; {expected}") from None


class _Mismatch(Exception):
    """What is wrong with the inputs; check_inputs adds the expected signature."""


def _check_inputs(specs: list[TensorSpec], inputs: Mapping[str, Any]) -> None:
    if not isinstance(inputs, Mapping):
        raise _Mismatch("inputs must be a dict of name -> numpy array")
    names = {spec.name for spec in specs}
    missing, extra = sorted(names - set(inputs)), sorted(set(inputs) - names)
    if missing or extra:
        raise _Mismatch(f"missing inputs {missing}, unknown inputs {extra}")
    free_dims: dict[str, tuple[int, str]] = {}  # name -> (size, first input)
    for spec in specs:
        value = inputs[spec.name]
        if not isinstance(value, np.ndarray):
            raise _Mismatch(f"input {spec.name!r} is a {type(value).__name__}, not a numpy array")
        if value.dtype != np.dtype(spec.dtype):
            raise _Mismatch(f"input {spec.name!r} has dtype {value.dtype}, needs {spec.dtype}")
        if value.ndim != len(spec.shape):
            raise _Mismatch(
                f"input {spec.name!r} has rank {value.ndim} (shape {list(value.shape)}), "
                f"needs rank {len(spec.shape)}"
            )
        for axis, (size, dim) in enumerate(zip(value.shape, spec.shape, strict=True)):
            if isinstance(dim, int):
                if size != dim:
                    raise _Mismatch(
                        f"input {spec.name!r} has size {size} on axis {axis}, needs {dim}"
                    )
            elif dim in UNSHARED_DIMS:
                continue  # bundles built before names were generated for '?' axes
            elif free_dims.setdefault(dim, (size, spec.name))[0] != size:
                first_size, first_input = free_dims[dim]
                where = "another of its axes" if first_input == spec.name else "another input"
                raise _Mismatch(
                    f"input {spec.name!r} has {dim}={size} but {where} has {dim}={first_size}"
                )


class InputChecker:
    """``check_inputs`` for one signature, prepared once per loaded bundle.

    The common case, a plain dict of arrays with the right names, dtypes and fixed shapes,
    costs a few comparisons: a small TFLite model runs in microseconds, so the check must
    too. Anything else goes through ``check_inputs``, which accepts the rest (free
    dimensions) or raises with the full message.
    """

    def __init__(self, specs: list[TensorSpec]) -> None:
        self.specs = specs
        fixed = all(isinstance(dim, int) for spec in specs for dim in spec.shape)
        self._plan = (
            tuple((spec.name, np.dtype(spec.dtype), tuple(spec.shape)) for spec in specs)
            if fixed
            else None
        )

    def __call__(self, inputs: Mapping[str, Any]) -> None:
        plan = self._plan
        if plan is not None and type(inputs) is dict and len(inputs) == len(plan):
            for name, dtype, shape in plan:
                value = inputs.get(name)
                if type(value) is not np.ndarray or value.dtype != dtype or value.shape != shape:
                    break
            else:
                return
        check_inputs(self.specs, inputs)
