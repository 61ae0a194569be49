"""Errors the collector raises; the CLI renders them once, at its boundary."""


class CollectorError(Exception):
    """Base class: something the operator can fix. The message says how."""


class StorageError(CollectorError):
    """The database URL is wrong or the database cannot be reached or migrated."""


class NotFoundError(CollectorError):
    """An API request named a device the collector has never heard from."""


class BadRequestError(CollectorError):
    """An API request has a malformed parameter."""
