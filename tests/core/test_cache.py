"""Atomic cache writes, deterministic npz bytes, resuming a StageCache."""
import numpy as np
import pytest

from fmalib.core.cache import (
    StageCache,
    atomic_path,
    atomic_save_npz,
    load_npz,
    stable_hash,
)
from fmalib.core.errors import FmalibError


def test_atomic_path_leaves_nothing_on_error(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("interrupted")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]


def test_npz_bytes_deterministic_and_corrupt_file_named(tmp_path):
    a = np.arange(12, dtype=np.float16).reshape(3, 4)
    atomic_save_npz(tmp_path / "a.npz", x=a)
    atomic_save_npz(tmp_path / "b.npz", x=a)
    assert (tmp_path / "a.npz").read_bytes() == (tmp_path / "b.npz").read_bytes()
    np.testing.assert_array_equal(load_npz(tmp_path / "a.npz")["x"], a)
    (tmp_path / "c.npz").write_bytes(b"garbage")
    with pytest.raises(FmalibError, match="c.npz"):
        load_npz(tmp_path / "c.npz")


def test_stage_cache_resumes_after_interruption(tmp_path):
    calls = []

    def run(ids, fail_at=None):
        cache = StageCache(tmp_path, "cams", {"p": 1}, code="fmalib.stages.cams")
        for i in ids:
            if cache.has(i):
                continue
            if i == fail_at:
                raise KeyboardInterrupt
            calls.append(i)
            cache.save_npz(i, v=np.full(3, int(i)))
        return cache

    with pytest.raises(KeyboardInterrupt):
        run(["1", "2", "3", "4"], fail_at="3")
    cache = run(["1", "2", "3", "4"])
    assert calls == ["1", "2", "3", "4"]  # 1 and 2 were not recomputed
    assert cache.done_ids() == {"1", "2", "3", "4"}
    other = StageCache(tmp_path, "cams", {"p": 2}, code="fmalib.stages.cams")
    assert other.dir != cache.dir  # other params, other directory
    assert stable_hash({"a": 1, "b": 2}) == stable_hash({"b": 2, "a": 1})



def test_atomic_files_get_normal_permissions(tmp_path):
    import os
    import stat

    atomic_save_npz(tmp_path / "p.npz", x=np.zeros(1))
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE((tmp_path / "p.npz").stat().st_mode) == 0o666 & ~umask
