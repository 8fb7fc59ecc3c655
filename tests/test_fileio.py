"""prefixvqa.fileio: all-or-nothing writes and files of installed packages (standard library + numpy only)."""

from __future__ import annotations

import os

import numpy as np
import pytest

from prefixvqa.fileio import atomic_dir, atomic_write, atomic_write_with, package_file


def test_atomic_write_replaces_and_leaves_no_temporary_file(tmp_path):
    target = tmp_path / "sub" / "metrics.json"
    atomic_write(target, "first ü\n")
    assert target.read_text(encoding="utf-8") == "first ü\n"
    atomic_write(target, b"second")
    assert target.read_bytes() == b"second"
    assert [p.name for p in target.parent.iterdir()] == ["metrics.json"]


def test_a_failing_writer_never_leaves_a_half_file(tmp_path):
    target = tmp_path / "features.npy"
    atomic_write(target, b"old")

    def half_then_crash(tmp):
        tmp.write_bytes(b"half of the new")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write_with(target, half_then_crash)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["features.npy"]
    with pytest.raises(OSError, match="disk full"):
        atomic_write_with(tmp_path / "new.npy", half_then_crash)
    assert [p.name for p in tmp_path.iterdir()] == ["features.npy"]  # no new file, no temporary one


def test_atomic_write_with_keeps_the_suffix_for_format_sniffing_writers(tmp_path):
    target = tmp_path / "x.npy"
    atomic_write_with(target, lambda tmp: np.save(tmp, np.arange(3)))  # np.save would append ".npy" to other names
    np.testing.assert_array_equal(np.load(target), np.arange(3))
    assert [p.name for p in tmp_path.iterdir()] == ["x.npy"]


def test_atomic_dir_swaps_in_complete_folders_only(tmp_path):
    target = tmp_path / "adapter"
    with atomic_dir(target) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".adapter.tmp-")
        (tmp / "weights").write_text("v1")
    assert (target / "weights").read_text() == "v1"
    with pytest.raises(RuntimeError):
        with atomic_dir(target, overwrite=True) as tmp:  # True: this folder has no manifest to prove it ours
            (tmp / "weights").write_text("v2 (half)")
            raise RuntimeError("killed")
    assert (target / "weights").read_text() == "v1"
    with atomic_dir(target, overwrite=True) as tmp:
        (tmp / "weights").write_text("v2")
    assert (target / "weights").read_text() == "v2"
    with atomic_dir(target, overwrite=False) as tmp:  # someone else's equivalent copy is kept
        (tmp / "weights").write_text("v3")
    assert (target / "weights").read_text() == "v2"
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]


def test_package_file_finds_files_without_importing_and_names_the_install_command():
    assert package_file("json", "decoder.py").is_file()
    assert package_file("json").is_dir()
    with pytest.raises(FileNotFoundError) as err:
        package_file("no_such_pkg_xyz", "model")
    assert "'no_such_pkg_xyz'" in str(err.value) and "pip install no-such-pkg-xyz" in str(err.value)
    needs = r"the demo needs the Python package 'no_such_pkg_xyz'.*pip install --no-deps"
    with pytest.raises(LookupError, match=needs):
        package_file("no_such_pkg_xyz", "data", "pip install --no-deps x", purpose="the demo", error=LookupError)
    with pytest.raises(FileNotFoundError, match="pip install no-such-parent"):
        package_file("no_such_parent.data")  # a missing parent package is "not installed" too


def test_feature_cache_put_is_atomic(tmp_path, monkeypatch):
    from prefixvqa.data.cache import FeatureCache

    cache = FeatureCache(tmp_path, "enc", "pre")
    cache.put("ab" * 32, np.ones((2, 3)))
    np.testing.assert_array_equal(cache.get("ab" * 32), np.ones((2, 3), dtype=np.float32))
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError("disk full")))  # after the bytes
    with pytest.raises(OSError, match="disk full"):
        cache.put("cd" * 32, np.ones((2, 3)))
    assert cache.get("cd" * 32) is None and len(cache) == 1
    assert sorted(p.name for p in cache.dir.rglob("*") if p.is_file()) == ["abab" * 16 + ".npy", "cache_info.json"]


def test_manifest_names_the_flipped_or_truncated_file(tmp_path):
    from prefixvqa.fileio import IntegrityError, verify_manifest, write_manifest

    (tmp_path / "sub").mkdir()
    (tmp_path / "a.bin").write_bytes(bytes(range(256)))
    (tmp_path / "sub" / "b.json").write_text('{"x": 1}')
    assert set(write_manifest(tmp_path)) == {"a.bin", "sub/b.json"}
    verify_manifest(tmp_path)
    data = bytearray((tmp_path / "a.bin").read_bytes())
    data[17] ^= 1
    (tmp_path / "a.bin").write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match=r"a\.bin does not match its sha256"):
        verify_manifest(tmp_path)
    (tmp_path / "a.bin").write_bytes(bytes(range(100)))
    with pytest.raises(IntegrityError, match=r"a\.bin has 100 bytes"):
        verify_manifest(tmp_path)
    (tmp_path / "a.bin").unlink()
    with pytest.raises(IntegrityError, match=r"a\.bin is missing"):
        verify_manifest(tmp_path)


def test_recover_dir_puts_back_the_newest_complete_folder_and_removes_leftovers(tmp_path):
    import pytest

    from prefixvqa.fileio import IntegrityError, recover_dir

    def make(name: str, content: str | None) -> None:
        (tmp_path / name).mkdir()
        if content is not None:
            (tmp_path / name / "done").write_text(content)

    complete = lambda folder: (folder / "done").is_file()  # noqa: E731
    make(".ckpt.old-1", "previous")  # a kill between the two renames of a swap
    make(".ckpt.tmp-2", "new")
    assert recover_dir(tmp_path / "ckpt", complete) == tmp_path / "ckpt"
    assert (tmp_path / "ckpt" / "done").read_text() == "new" and os.listdir(tmp_path) == ["ckpt"]
    make(".ckpt.tmp-3", None)  # a kill while writing the next one: the current folder stays, the half is removed
    assert recover_dir(tmp_path / "ckpt", complete) and os.listdir(tmp_path) == ["ckpt"]
    os.rename(tmp_path / "ckpt", tmp_path / ".ckpt.old-4")
    make(".ckpt.tmp-5", None)
    assert recover_dir(tmp_path / "ckpt", complete) and (tmp_path / "ckpt" / "done").read_text() == "new"
    assert os.listdir(tmp_path) == ["ckpt"]
    assert recover_dir(tmp_path / "none", complete) is None
    (tmp_path / "ckpt" / "done").unlink()
    os.rename(tmp_path / "ckpt", tmp_path / ".ckpt.old-6")
    with pytest.raises(IntegrityError, match=r"ckpt is missing .*\.ckpt\.old-6"):
        recover_dir(tmp_path / "ckpt", complete)
    assert os.listdir(tmp_path) == [".ckpt.old-6"]  # a damaged only copy is kept as evidence
    (tmp_path / ".ckpt.old-6" / "done").write_text("previous")
    make("ckpt", None)  # a damaged current folder next to a complete leftover: the leftover takes its place
    assert recover_dir(tmp_path / "ckpt", complete) and (tmp_path / "ckpt" / "done").read_text() == "previous"
    assert os.listdir(tmp_path) == ["ckpt"]


# ------------------------------------------------------------------------------ replacing only what prefixvqa wrote
def test_atomic_dir_replaces_only_a_folder_its_manifest_proves_ours(tmp_path):
    from prefixvqa.fileio import MANIFEST_NAME, OverwriteRefused, write_manifest

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    ran = []
    with pytest.raises(OverwriteRefused) as refused:
        with atomic_dir(mine) as tmp:
            ran.append(tmp)
    assert not ran and "\n" not in str(refused.value) and str(mine) in str(refused.value)
    assert "thesis.tex" in str(refused.value) and (mine / "thesis.tex").read_text() == "years of work"
    assert isinstance(refused.value, FileExistsError) and isinstance(refused.value, ValueError)

    ours = tmp_path / "ours"
    with atomic_dir(ours) as tmp:
        (tmp / "weights").write_text("v1")
        write_manifest(tmp)
    with atomic_dir(ours) as tmp:  # its manifest lists every file: replaced
        (tmp / "weights").write_text("v2")
        write_manifest(tmp)
    assert (ours / "weights").read_text() == "v2"
    (ours / ".hidden-notes").write_text("mine")  # a file the manifest does not list, hidden or not, stops it
    with pytest.raises(OverwriteRefused, match=r"\.hidden-notes"):
        with atomic_dir(ours) as tmp:
            (tmp / "weights").write_text("v3")
    assert (ours / "weights").read_text() == "v2" and (ours / ".hidden-notes").read_text() == "mine"

    (tmp_path / "empty").mkdir()
    with atomic_dir(tmp_path / "empty") as tmp:  # nothing to lose
        (tmp / "weights").write_text("v1")
    with pytest.raises(OverwriteRefused, match="it is not a folder"):
        with atomic_dir(tmp_path / "mine" / "thesis.tex"):
            pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "mine", "ours"]
    assert (ours / MANIFEST_NAME).is_file()


def test_a_folder_changed_during_the_write_is_refused_at_the_swap(tmp_path):
    from prefixvqa.fileio import OverwriteRefused

    target = tmp_path / "adapter"
    with pytest.raises(OverwriteRefused, match="notes.txt"):
        with atomic_dir(target) as tmp:
            (tmp / "weights").write_text("new")
            target.mkdir()
            (target / "notes.txt").write_text("written meanwhile")
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]
    assert (target / "notes.txt").read_text() == "written meanwhile"


def test_errors_name_the_target_never_the_temporary_sibling(tmp_path):
    import errno

    target = tmp_path / "adapter"

    def full(tmp):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp / "sub" / "weights.bin"))

    with pytest.raises(OSError) as failed:
        with atomic_dir(target) as tmp:
            full(tmp)
    assert failed.value.errno == errno.ENOSPC and failed.value.filename == str(target / "sub" / "weights.bin")
    assert f"while saving {target} (left as it was)" in str(failed.value) and ".tmp" not in str(failed.value)

    def read_only(tmp):
        raise OSError(errno.EROFS, "Read-only file system", str(tmp))

    with pytest.raises(OSError) as failed:
        atomic_write_with(tmp_path / "x.npy", read_only)
    assert failed.value.errno == errno.EROFS and failed.value.filename == str(tmp_path / "x.npy")
    assert not list(tmp_path.iterdir())


def test_save_safetensors_turns_a_full_disk_into_an_oserror_naming_the_file(tmp_path, monkeypatch):
    import errno

    import safetensors.torch
    import torch
    from safetensors import SafetensorError

    from prefixvqa.fileio import save_safetensors

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "serialize_file", full)
    with pytest.raises(OSError) as failed:
        save_safetensors({"a": torch.zeros(2)}, tmp_path / "w.safetensors")
    assert failed.value.errno == errno.ENOSPC and failed.value.filename == str(tmp_path / "w.safetensors")
    assert str(failed.value) == f"[Errno 28] No space left on device: '{tmp_path / 'w.safetensors'}'"
