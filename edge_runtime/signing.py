"""Ed25519 keys and signatures over the manifest bytes.

Keys are PEM files (PKCS#8 private, SubjectPublicKeyInfo public), so standard tools
(``openssl pkey``) can read them too.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

from .errors import SignatureError, TrustError

TRUSTED_KEYS_ENV = "EDGEPACK_TRUSTED_KEYS"
log = logging.getLogger(__name__)


def load_public_key(path: Path):
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    try:
        key = load_pem_public_key(Path(path).read_bytes())
    except FileNotFoundError:
        raise TrustError(f"public key {path} does not exist") from None
    except ValueError as exc:
        raise TrustError(f"{path} is not a PEM public key: {exc}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise TrustError(f"{path} is not an Ed25519 public key (edgepack keygen makes one)")
    return key


def key_id(public_key) -> str:
    """Short fingerprint of a public key: first 16 hex digits of sha256 of its raw bytes."""
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    raw = public_key.public_bytes(Encoding.Raw, PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def trusted_key_paths() -> list[Path]:
    """Trusted public keys: files, or folders of ``*.pub``, listed in $EDGEPACK_TRUSTED_KEYS."""
    paths: list[Path] = []
    for item in filter(None, os.environ.get(TRUSTED_KEYS_ENV, "").split(os.pathsep)):
        location = Path(item)
        paths.extend(sorted(location.glob("*.pub")) if location.is_dir() else [location])
    return paths


def verify_manifest_signature(manifest_bytes: bytes, signature: bytes, pubkey: Path | None) -> str:
    """Check ``signature`` over ``manifest_bytes``; return the id of the key that signed it.

    Args:
        manifest_bytes: the exact bytes of ``manifest.json`` from the archive.
        signature: the 64 raw signature bytes from ``manifest.sig``.
        pubkey: a PEM public key file, or None to try the trusted keys.

    Raises:
        TrustError: no key given and none configured.
        SignatureError: no candidate key verifies the signature.
    """
    from cryptography.exceptions import InvalidSignature

    candidates = [Path(pubkey)] if pubkey else trusted_key_paths()
    if not candidates:
        raise TrustError(
            "no public key to verify the bundle: pass --pubkey FILE, or set "
            f"{TRUSTED_KEYS_ENV} to a .pub file or a folder of them"
        )
    for path in candidates:
        try:
            key = load_public_key(path)
        except TrustError as exc:
            if pubkey:  # the key the caller named must be good
                raise
            # One stale entry in the trusted set must not block the others (key rotation).
            log.warning("skipping trusted key: %s", exc)
            continue
        try:
            key.verify(signature, manifest_bytes)
        except InvalidSignature:
            continue
        return key_id(key)
    names = ", ".join(str(path) for path in candidates)
    raise SignatureError(
        f"bundle signature does not verify with {names}: the bundle was modified or "
        "signed with a different key"
    )
