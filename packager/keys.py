"""Ed25519 signing keys: generate and load (the runtime only ever sees the public key)."""

from __future__ import annotations

import os
from pathlib import Path

from .errors import KeyFileError

PRIVATE_NAME = "edgepack.key"
PUBLIC_NAME = "edgepack.pub"


def generate_keypair(out_dir: Path, overwrite: bool = False) -> tuple[Path, Path]:
    """Write ``edgepack.key`` (mode 0600) and ``edgepack.pub`` into ``out_dir``.

    Raises:
        KeyFileError: a key already exists there and ``overwrite`` is False.
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    private_path, public_path = out_dir / PRIVATE_NAME, out_dir / PUBLIC_NAME
    if not overwrite and (private_path.exists() or public_path.exists()):
        raise KeyFileError(
            f"{private_path} or {public_path} already exists; refusing to overwrite a signing "
            "key (pass --force to replace it)"
        )
    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    private_path.unlink(missing_ok=True)
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(private_pem)
    public_path.write_bytes(public_pem)
    return private_path, public_path


def load_private_key(path: Path):
    """Load a PEM Ed25519 private key.

    Raises:
        KeyFileError: missing, unreadable or not Ed25519.
    """
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    path = Path(path)
    if not path.is_file():
        raise KeyFileError(f"signing key {path} does not exist; create one with `edgepack keygen`")
    try:
        key = load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError) as exc:
        raise KeyFileError(f"{path} is not an unencrypted PEM private key: {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"{path} is not an Ed25519 key; create one with `edgepack keygen`")
    return key
