"""Own data without surprises: split lists with repeats, reorders or spaces, EXIF-rotated photos, leftover temp
files, I/O failures, interrupts, zero iterations, non-YAML params and concurrent runs of one stage — each a
defined result or one error naming the file, key or path."""
from __future__ import annotations

import errno
import logging
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fmalib.core.cache import StageCache, atomic_write_bytes, dir_fingerprint
from fmalib.core.errors import FmalibError
from fmalib.core.locks import lock_path
from fmalib.core.params import load_params
from fmalib.data.check import check_split
from fmalib.data.fingerprint import split_key
from fmalib.data.labels import write_label_png
from fmalib.data.layouts import write_voc_layout
from fmalib.data.voc import VOCDataset, read_image
from fmalib.stages.prompt_runs import train_cache
from fmalib.study import cli, setup

REPO = Path(__file__).resolve().parents[2]
CODE = "fmalib.stages.masks"


@pytest.fixture()
def voc(tmp_path):
    return write_voc_layout(tmp_path / "VOC2012", n_train=4, n_val=1)


def _voc_params(root: Path, tmp_path: Path):
    return load_params("params/voc.yaml", {"data.root": str(root), "workdir": str(tmp_path / "work")})


def _train_list(root: Path) -> Path:
    return root / "ImageSets/Segmentation/train.txt"


# ------------------------------------------------------------------------------------------- split lists
def test_repeated_ids_are_one_error_with_their_lines(voc):
    ids = _train_list(voc).read_text().split()
    _train_list(voc).write_text("\n".join(ids + ids[:2]) + "\n")
    with pytest.raises(FmalibError) as exc:
        VOCDataset(voc, "train")
    msg = str(exc.value)
    assert msg.startswith(f"split list {_train_list(voc)}: 2 problem(s)")
    assert f"id {ids[0]!r} repeated on lines 1, 5" in msg and f"id {ids[1]!r} repeated on lines 2, 6" in msg


def test_a_reordered_split_is_another_data_key(voc, tmp_path):
    params = _voc_params(voc, tmp_path)
    before = split_key(params, "train")
    ids = _train_list(voc).read_text().split()
    _train_list(voc).write_text("\n".join(ids[::-1]) + "\n")
    assert split_key(params, "train") != before
    _train_list(voc).write_text("\n".join(ids) + "\n")
    assert split_key(params, "train") == before


def test_an_id_with_a_space_is_refused_naming_the_line(voc):
    image = next((voc / "JPEGImages").glob("*.jpg"))
    shutil.copy(image, voc / "JPEGImages/s bus.jpg")
    with _train_list(voc).open("a") as f:
        f.write("s bus\n")
    with pytest.raises(FmalibError, match=r"line 5: 's bus' is neither one id.*ids cannot hold spaces"):
        VOCDataset(voc, "train")


# ------------------------------------------------------------------------------------------- EXIF
def _exif_png(path: Path, pixels: np.ndarray, orientation: int) -> None:
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(pixels).save(path, exif=exif)


def test_exif_orientation_is_applied_noted_and_named_in_a_size_mismatch(voc):
    ds = VOCDataset(voc, "train")
    iid = ds.ids[0]
    stored = np.random.default_rng(0).integers(0, 255, (20, 30, 3), dtype=np.uint8)  # H 20, W 30 as stored
    (voc / f"JPEGImages/{iid}.jpg").unlink()
    _exif_png(voc / f"JPEGImages/{iid}.png", stored, 6)  # 6: viewers rotate it 90° clockwise
    assert np.array_equal(read_image(voc / f"JPEGImages/{iid}.png"), np.rot90(stored, k=-1))
    label = np.zeros((30, 20), np.uint8)  # drawn on the displayed photo
    label[5:10, 5:10] = 1
    write_label_png(voc / f"SegmentationClass/{iid}.png", label)
    item = VOCDataset(voc, "train")[0]
    assert item["image"].shape == (30, 20, 3) and item["labels"].tolist() == [1]
    notes = [p for p in check_split(VOCDataset(voc, "train")) if iid in p.path and not p.error]
    assert any("EXIF orientation 6: read rotated as viewers show it" in p.message for p in notes)
    write_label_png(voc / f"SegmentationClass/{iid}.png", np.zeros((20, 30), np.uint8))  # drawn on stored pixels
    with pytest.raises(FmalibError, match="carries EXIF orientation 6: fmalib reads it rotated"):
        VOCDataset(voc, "train")[0]
    errors = [p.message for p in check_split(VOCDataset(voc, "train")) if p.error]
    assert any("carries EXIF orientation 6: fmalib reads it rotated" in m for m in errors)


# ------------------------------------------------------------------------------------------- stray files
def test_a_leftover_temp_file_changes_no_fingerprint_and_is_named(voc, tmp_path, caplog):
    seeds = tmp_path / "seeds"
    seeds.mkdir()
    write_label_png(seeds / "a.png", np.ones((4, 4), np.uint8))
    params = load_params("params/toy.yaml", {"data.root": str(tmp_path / "data"), "workdir": str(tmp_path / "w"),
                                             "data.synthetic.n_train": 2, "data.synthetic.n_val": 1})
    before, key = dir_fingerprint(seeds), train_cache(params, "seg", seeds).key
    (seeds / ".a.png.x1y2.tmp.png").write_bytes(b"half a png")  # what a kill between write and rename leaves
    with caplog.at_level(logging.WARNING):
        assert dir_fingerprint(seeds) == before and train_cache(params, "seg", seeds).key == key
    assert ".a.png.x1y2.tmp.png" in caplog.text
    (voc / "JPEGImages/.x.jpg.tmp.jpg").write_bytes(b"")
    notes = [str(p) for p in check_split(VOCDataset(voc, "train")) if not p.error]
    assert any(".x.jpg.tmp.jpg: hidden or temporary file" in n for n in notes)


def test_a_truncated_cache_file_is_recomputed(tmp_path, caplog):
    cache = StageCache(tmp_path, "masks", {"k": 1}, code=CODE)
    cache.save_npz("a", x=np.arange(1000))
    write_label_png(cache.path("b", ".png"), np.ones((8, 8), np.uint8))
    assert cache.has("a") and cache.has("b", ".png")
    for path in (cache.path("a"), cache.path("b", ".png")):
        path.write_bytes(path.read_bytes()[:-20])
    with caplog.at_level(logging.WARNING):
        assert not cache.has("a") and not cache.has("b", ".png")
    assert "is incomplete (truncated?): removing it; it is recomputed" in caplog.text
    assert not cache.path("a").exists()


# ------------------------------------------------------------------------------------------- I/O failures
def _fail_with(monkeypatch, code: int, method: str = "write_bytes"):
    real = getattr(Path, method)

    def failing(self, *args, **kwargs):
        if "wd_x" in str(self):
            raise OSError(code, os.strerror(code), str(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, method, failing)


def test_a_full_disk_is_one_error_naming_the_file_and_nothing_is_left(tmp_path, monkeypatch):
    _fail_with(monkeypatch, errno.ENOSPC)
    target = tmp_path / "wd_x" / "masks" / "a.npz"
    with pytest.raises(FmalibError) as exc:
        atomic_write_bytes(target, b"x" * 100)
    assert str(exc.value) == f"could not write {target}: No space left on device — no space left on the device: " \
                             f"free some and rerun (finished items are kept)"
    assert list(target.parent.iterdir()) == []  # no temp file, no half file


@pytest.fixture()
def tiny_tmpfs(tmp_path):
    """A 64 KiB tmpfs, where this machine lets a test mount one (root, mount allowed)."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)],
                                           capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here; the injected-OSError tests cover the messages")
    yield mnt
    subprocess.run(["umount", str(mnt)], capture_output=True)


def test_a_real_full_disk_and_read_only_mount(tiny_tmpfs):
    target = tiny_tmpfs / "work" / "masks" / "a.npz"
    with pytest.raises(FmalibError, match=rf"^could not write {target}: No space left on device — "):
        atomic_write_bytes(target, os.urandom(200_000))
    assert list(target.parent.iterdir()) == []
    subprocess.run(["mount", "-o", "remount,ro", str(tiny_tmpfs)], check=True)
    with pytest.raises(FmalibError, match=r"^could not create the folder .*: Read-only file system — the file "
                                          r"system is read-only: point workdir at a writable folder"):
        StageCache(tiny_tmpfs / "other", "masks", {"k": 4}, code=CODE)


def test_cli_on_a_read_only_workdir_says_so_without_a_traceback(tmp_path, monkeypatch, capsys):
    _fail_with(monkeypatch, errno.EROFS, "mkdir")
    rc = cli.main(["masks", "--params", "params/toy.yaml", "--fast", "--set", f"workdir={tmp_path}/wd_x",
                   "--set", f"data.root={tmp_path}/data", "--set", "data.synthetic.n_train=2",
                   "--set", "data.synthetic.n_val=1"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    err = err.strip().splitlines()[-1]
    assert err.startswith(f"fmalib masks: error: could not create the folder {tmp_path}/wd_x/")
    assert "read-only: point workdir at a writable folder (--set workdir=DIR)" in err


def test_ctrl_c_stops_with_one_line_saying_what_was_kept(tmp_path, monkeypatch, capsys):
    def interrupted(params, split, shard=None, force=False):
        cache = StageCache(tmp_path, "masks", {"k": 2}, code=CODE)
        cache.save_npz("done", x=np.zeros(2))
        raise KeyboardInterrupt

    import fmalib.stages.masks

    monkeypatch.setattr(fmalib.stages.masks, "run_mask_stage", interrupted)  # the CLI imports it when it runs
    rc = cli.main(["masks", "--params", "params/toy.yaml", "--set", f"workdir={tmp_path}/w"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 130 and len(err) == 1
    assert err[0].startswith("fmalib masks: interrupted; 1 finished file(s) kept in ") and "rerun" in err[0]


# ------------------------------------------------------------------------------------------- params
def test_zero_iterations_and_non_yaml_params_and_set_values_are_named(tmp_path):
    with pytest.raises(FmalibError, match=r"^--set prompts.cls.iters=0 \(over .*params/toy.yaml\): key "
                                          r"prompts.cls.iters is 0; expected >= 1$"):
        setup("params/toy.yaml", overrides={"prompts.cls.iters": 0})
    png = tmp_path / "params.png"
    Image.new("RGB", (4, 4)).save(png)
    with pytest.raises(FmalibError, match=rf"^params file {png} is not a text file"):
        load_params(png)


# ------------------------------------------------------------------------------------------- concurrency
def test_items_another_live_process_holds_are_waited_for_then_taken_over(tmp_path, caplog):
    cache = StageCache(tmp_path, "masks", {"k": 3}, code=CODE)
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    lock_path(cache.path("b")).write_text(f"{os.uname().nodename} {holder.pid}\n")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock_path(cache.path("c")).write_text(f"{os.uname().nodename} {int(dead.stdout)}\n")  # stale: taken at once
    threading.Timer(0.5, lambda: (holder.kill(), holder.wait())).start()  # reaped: a zombie pid still answers
    with caplog.at_level(logging.INFO):
        order = []
        for item in cache.claim_each(["a", "b", "c"], poll_s=0.05):
            assert lock_path(cache.path(item)).is_file()  # held while the caller computes it
            order.append(item)
            cache.save_npz(item, x=np.zeros(1))
    holder.wait()
    assert order == ["a", "c", "b"]  # b once its holder was gone without writing it
    assert f"waiting for 1 item(s) another process is computing ({os.uname().nodename}:{holder.pid})" in caplog.text
    assert not any(p.name.endswith(".lock") for p in cache.dir.iterdir())
    assert list(cache.claim_each(["a", "b", "c"])) == []  # all cached now


def test_two_mask_processes_on_one_shard_compute_each_image_once(tmp_path):
    args = [sys.executable, "-m", "fmalib", "masks", "--params", str(REPO / "params/toy.yaml"), "--fast",
            "--set", f"workdir={tmp_path}/work", "--set", f"data.root={tmp_path}/data",
            "--set", "data.synthetic.n_train=6", "--set", "data.synthetic.n_val=1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    logs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), logs
    computed = [int(line.split("computed ")[1].split()[0]) for log in logs for line in log.splitlines()
                if ": computed " in line]
    assert sum(computed) == 6, logs
