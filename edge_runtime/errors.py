"""Errors the device runtime raises; the CLI renders them once, at its boundary."""


class EdgeRuntimeError(Exception):
    """Base class for everything the runtime raises on purpose."""


class BundleError(EdgeRuntimeError):
    """A bundle is unreadable, tampered with, or unsafe to extract."""


class SignatureError(BundleError):
    """The manifest signature does not verify with the given or trusted key."""


class TrustError(EdgeRuntimeError):
    """No public key was given and none is configured as trusted."""


class InputSignatureError(EdgeRuntimeError):
    """Inputs to ``run`` do not match the model signature in the manifest."""


class BackendError(EdgeRuntimeError):
    """The inference engine for the bundle is missing or failed to load."""


class ModelFileError(EdgeRuntimeError):
    """A model file is malformed or truncated (checked before the engine loads it)."""


class TelemetryError(EdgeRuntimeError):
    """A telemetry message cannot be sent as asked (e.g. larger than a collector accepts)."""


class ServiceError(EdgeRuntimeError):
    """``edge-runtime serve`` cannot start as asked (bundle names, key or TLS files)."""


class AccessError(ServiceError):
    """Serving would expose the models without an API key, or the key is unusable."""
