import stat

import pytest

from edge_runtime.signing import key_id, load_public_key
from packager.errors import KeyFileError
from packager.keys import generate_keypair, load_private_key


def test_keygen_writes_a_private_key_only_the_owner_can_read(tmp_path):
    private, public = generate_keypair(tmp_path)

    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    signing_key = load_private_key(private)
    assert key_id(signing_key.public_key()) == key_id(load_public_key(public))


def test_keygen_refuses_to_overwrite_without_force(tmp_path):
    generate_keypair(tmp_path)
    before = (tmp_path / "edgepack.key").read_bytes()

    with pytest.raises(KeyFileError, match="refusing to overwrite"):
        generate_keypair(tmp_path)

    assert (tmp_path / "edgepack.key").read_bytes() == before
    generate_keypair(tmp_path, overwrite=True)
    assert (tmp_path / "edgepack.key").read_bytes() != before


def test_bad_private_keys_are_refused(tmp_path):
    with pytest.raises(KeyFileError, match="edgepack keygen"):
        load_private_key(tmp_path / "missing.key")
    junk = tmp_path / "junk.key"
    junk.write_text("not a key")
    with pytest.raises(KeyFileError, match="not an unencrypted PEM"):
        load_private_key(junk)
