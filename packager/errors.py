"""Errors the packager raises; the CLI renders them once, at its boundary."""


class PackagerError(Exception):
    """Base class: something the user can fix. The message says how."""


class ProfileError(PackagerError):
    """A device profile is missing, unknown or invalid."""


class ModelValidationError(PackagerError):
    """The source model is malformed, unsafe or unsupported."""


class DataError(PackagerError):
    """Calibration or evaluation data does not match the model."""


class GateError(PackagerError):
    """No recipe in the chain met the accuracy threshold."""

    def __init__(self, message: str, attempts: list | None = None) -> None:
        super().__init__(message)
        self.attempts = attempts or []


class FitError(PackagerError):
    """The packaged model does not fit the profile's memory budget."""


class IncompatiblePassError(PackagerError):
    """A pass cannot run for the chosen profile (declared capabilities do not match)."""


class KeyFileError(PackagerError):
    """A signing key is missing or malformed."""
