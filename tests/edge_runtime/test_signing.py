"""Tests for edge_runtime/signing.py: Ed25519 over the manifest bytes, and trusted keys."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tarfile
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from edge_runtime.bundle import verify_bundle
from edge_runtime.errors import SignatureError, TrustError
from edge_runtime.manifest import MANIFEST_NAME, SIGNATURE_NAME
from edge_runtime.signing import (
    TRUSTED_KEYS_ENV,
    key_id,
    load_public_key,
    trusted_key_paths,
    verify_manifest_signature,
)
from packager.keys import load_private_key


@pytest.fixture(scope="module")
def signed(cnn_bundle) -> tuple[bytes, bytes]:
    """The real bundle's manifest bytes and their signature."""
    with tarfile.open(cnn_bundle, mode="r:") as archive:
        manifest = archive.extractfile(MANIFEST_NAME).read()
        signature = archive.extractfile(SIGNATURE_NAME).read()
    return manifest, signature


def key_folder(root: Path, *public_keys: Path) -> Path:
    """A folder holding copies of ``public_keys`` as ``0.pub``, ``1.pub``, ..."""
    root.mkdir()
    for index, key in enumerate(public_keys):
        shutil.copy(key, root / f"{index}.pub")
    return root


def raw_key_id(public_key: Path) -> str:
    raw = load_public_key(public_key).public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    return hashlib.sha256(raw).hexdigest()[:16]


def test_key_id_is_a_sha256_prefix_of_the_raw_public_key(keypair):
    public_key = load_public_key(keypair[1])

    assert key_id(public_key) == raw_key_id(keypair[1])
    assert re.fullmatch(r"[0-9a-f]{16}", key_id(public_key))


def test_verify_with_the_signing_key_returns_its_id(signed, keypair):
    manifest, signature = signed

    signer = verify_manifest_signature(manifest, signature, keypair[1])

    assert signer == raw_key_id(keypair[1])


def test_signature_made_with_the_private_key_verifies(keypair):
    data = b'{"name": "anything"}\n'
    signature = load_private_key(keypair[0]).sign(data)

    assert verify_manifest_signature(data, signature, keypair[1]) == raw_key_id(keypair[1])


def test_wrong_key_raises_signature_error_naming_the_key(signed, other_keypair):
    manifest, signature = signed

    with pytest.raises(SignatureError) as caught:
        verify_manifest_signature(manifest, signature, other_keypair[1])

    assert str(other_keypair[1]) in str(caught.value)
    assert "modified or signed with a different key" in str(caught.value)


@pytest.mark.parametrize(
    "tamper",
    [
        pytest.param(lambda m, s: (m + b" ", s), id="manifest-byte-appended"),
        pytest.param(lambda m, s: (m.replace(b"digits-cnn", b"digits-cnx"), s), id="name-edited"),
        pytest.param(lambda m, s: (m, bytes([s[0] ^ 1]) + s[1:]), id="signature-bit-flipped"),
        pytest.param(lambda m, s: (m, s[:32]), id="signature-truncated"),
        pytest.param(lambda m, s: (m, b""), id="signature-empty"),
    ],
)
def test_tampered_manifest_or_signature_raises_signature_error(signed, keypair, tamper):
    manifest, signature = tamper(*signed)

    with pytest.raises(SignatureError, match="bundle signature does not verify"):
        verify_manifest_signature(manifest, signature, keypair[1])


@pytest.mark.parametrize("setting", [None, "", os.pathsep])
def test_no_key_and_none_trusted_raises_trust_error(signed, monkeypatch, setting):
    if setting is not None:
        monkeypatch.setenv(TRUSTED_KEYS_ENV, setting)

    with pytest.raises(TrustError) as caught:
        verify_manifest_signature(*signed, None)

    assert "pass --pubkey FILE" in str(caught.value)
    assert TRUSTED_KEYS_ENV in str(caught.value)


def test_trusted_folder_without_keys_raises_trust_error(signed, monkeypatch, tmp_path):
    empty = tmp_path / "trusted"
    empty.mkdir()
    (empty / "README.txt").write_text("keys go here")
    monkeypatch.setenv(TRUSTED_KEYS_ENV, str(empty))

    with pytest.raises(TrustError, match="no public key to verify the bundle"):
        verify_manifest_signature(*signed, None)


def test_trusted_key_file_from_the_environment(signed, keypair, monkeypatch):
    monkeypatch.setenv(TRUSTED_KEYS_ENV, str(keypair[1]))

    assert verify_manifest_signature(*signed, None) == raw_key_id(keypair[1])


@pytest.mark.parametrize("order", ["other-first", "signer-first"])
def test_trusted_folder_tries_every_key(
    signed, keypair, other_keypair, monkeypatch, tmp_path, order
):
    keys = (
        (other_keypair[1], keypair[1]) if order == "other-first" else (keypair[1], other_keypair[1])
    )
    monkeypatch.setenv(TRUSTED_KEYS_ENV, str(key_folder(tmp_path / "trusted", *keys)))

    assert verify_manifest_signature(*signed, None) == raw_key_id(keypair[1])


def test_trusted_list_mixes_files_and_folders(
    signed, keypair, other_keypair, monkeypatch, tmp_path
):
    folder = key_folder(tmp_path / "trusted", keypair[1])
    monkeypatch.setenv(TRUSTED_KEYS_ENV, os.pathsep.join([str(other_keypair[1]), str(folder)]))

    assert trusted_key_paths() == [other_keypair[1], folder / "0.pub"]
    assert verify_manifest_signature(*signed, None) == raw_key_id(keypair[1])


def test_trusted_folder_only_lists_pub_files(keypair, monkeypatch):
    # keypair's folder also holds the private key edgepack.key
    monkeypatch.setenv(TRUSTED_KEYS_ENV, str(keypair[1].parent))

    assert trusted_key_paths() == [keypair[1]]


def test_only_untrusted_keys_raise_signature_error_naming_them(
    signed, other_keypair, monkeypatch, tmp_path
):
    folder = key_folder(tmp_path / "trusted", other_keypair[1])
    monkeypatch.setenv(TRUSTED_KEYS_ENV, str(folder))

    with pytest.raises(SignatureError, match=re.escape(str(folder / "0.pub"))):
        verify_manifest_signature(*signed, None)


def test_explicit_key_wins_over_trusted_keys(signed, keypair, other_keypair, monkeypatch):
    monkeypatch.setenv(TRUSTED_KEYS_ENV, str(keypair[1]))

    with pytest.raises(SignatureError):
        verify_manifest_signature(*signed, other_keypair[1])


def test_verify_bundle_uses_trusted_keys(cnn_bundle, keypair, monkeypatch):
    monkeypatch.setenv(TRUSTED_KEYS_ENV, str(keypair[1].parent))

    verified = verify_bundle(cnn_bundle)

    assert verified.key_id == raw_key_id(keypair[1])


def test_verify_bundle_without_any_key_raises_trust_error(cnn_bundle):
    with pytest.raises(TrustError, match=TRUSTED_KEYS_ENV):
        verify_bundle(cnn_bundle)


def test_verify_bundle_with_the_wrong_key_raises_signature_error(cnn_bundle, other_keypair):
    with pytest.raises(SignatureError, match="signed with a different key"):
        verify_bundle(cnn_bundle, other_keypair[1])


def _ec_public_pem() -> bytes:
    return (
        ec.generate_private_key(ec.SECP256R1())
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )


@pytest.mark.parametrize(
    ("content", "phrase"),
    [
        pytest.param(lambda keypair: b"not a key\n", "is not a PEM public key", id="not-pem"),
        pytest.param(lambda keypair: b"", "is not a PEM public key", id="empty"),
        pytest.param(
            lambda keypair: keypair[0].read_bytes(), "is not a PEM public key", id="private-key"
        ),
        pytest.param(lambda keypair: _ec_public_pem(), "is not an Ed25519 public key", id="ec-key"),
    ],
)
def test_load_public_key_refuses_what_is_not_an_ed25519_public_key(
    content, phrase, keypair, tmp_path
):
    path = tmp_path / "key.pub"
    path.write_bytes(content(keypair))

    with pytest.raises(TrustError, match=phrase):
        load_public_key(path)


def test_load_public_key_refuses_a_missing_file(tmp_path):
    with pytest.raises(TrustError, match="does not exist"):
        load_public_key(tmp_path / "missing.pub")


def test_a_broken_trusted_key_does_not_block_the_others(cnn_bundle, keypair, tmp_path, monkeypatch):
    broken = tmp_path / "old.pub"
    broken.write_text("not a key")
    monkeypatch.setenv("EDGEPACK_TRUSTED_KEYS", os.pathsep.join([str(broken), str(keypair[1])]))

    verified = verify_bundle(cnn_bundle, None)

    assert verified.manifest.name == "digits-cnn"
