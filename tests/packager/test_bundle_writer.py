import tarfile

from packager.bundle_writer import write_bundle


def test_archive_is_sorted_owned_by_root_and_stamped_with_the_given_time(tmp_path):
    (tmp_path / "b.bin").write_bytes(b"bbb")
    (tmp_path / "a.bin").write_bytes(b"a")
    output = tmp_path / "out.edgepkg"

    write_bundle(
        output,
        b"{}",
        b"s" * 64,
        {"z/b.bin": tmp_path / "b.bin", "a/a.bin": tmp_path / "a.bin"},
        1234,
    )

    with tarfile.open(output) as archive:
        members = archive.getmembers()
    assert [m.name for m in members] == ["a/a.bin", "manifest.json", "manifest.sig", "z/b.bin"]
    assert {(m.uid, m.gid, m.uname, m.gname, m.mode, m.mtime) for m in members} == {
        (0, 0, "", "", 0o644, 1234)
    }
    assert all(m.isreg() for m in members)
    assert not (tmp_path / "out.edgepkg.partial").exists()


def test_same_inputs_give_the_same_bytes(tmp_path):
    (tmp_path / "m").write_bytes(b"model")
    first, second = tmp_path / "1.edgepkg", tmp_path / "2.edgepkg"

    write_bundle(first, b"{}", b"s" * 64, {"model/m": tmp_path / "m"}, 0)
    (tmp_path / "m").touch()  # a new file mtime must not leak into the archive
    write_bundle(second, b"{}", b"s" * 64, {"model/m": tmp_path / "m"}, 0)

    assert first.read_bytes() == second.read_bytes()
