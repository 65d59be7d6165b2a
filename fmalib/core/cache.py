"""Atomic writes and a content-addressed, resumable stage cache.

A stage's cache directory is ``root/stage/<key>`` where ``key`` hashes the stage's inputs, the params that
change its result and the code that computes it (``fmalib.core.code_key``: the source of the stage's module
and everything it imports), so changing any of them starts a fresh directory and never mixes results.
Every file lands by rename, so an interrupted run leaves finished items intact and nothing half-written:
rerunning skips what ``has()`` reports done.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import logging
import os
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch

from .code_key import changed_modules, code_manifest
from .errors import FmalibError, io_error
from .locks import holders, try_lock, unlock

log = logging.getLogger(__name__)
_UMASK = os.umask(0)
os.umask(_UMASK)


def make_dir(path: str | os.PathLike) -> Path:
    """``mkdir -p``; a read-only or full file system is one FmalibError naming the folder."""
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise io_error(exc, path, "create the folder") from None
    return Path(path)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path beside ``path``; on success rename it onto ``path``, on error remove it. An OSError
    while writing (no space left, read-only, permission) is one FmalibError naming ``path``."""
    path = Path(path)
    make_dir(path.parent)
    tmp = None
    try:
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + path.suffix, dir=path.parent)
        os.close(fd)
        tmp = Path(name)
        yield tmp
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; give them the usual permissions
        os.replace(tmp, path)
    except OSError as exc:
        raise io_error(exc, path) from None
    finally:
        if tmp is not None and tmp.exists():
            tmp.unlink()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_save_npz(path: str | os.PathLike, **arrays: np.ndarray) -> Path:
    """Compressed npz, written atomically. Bytes are deterministic for equal arrays."""
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    return atomic_write_bytes(path, _strip_zip_times(buf.getvalue()))


def torch_bytes(obj: Any) -> bytes:
    """``torch.save`` into memory: saved to a file, the zip's record names carry the (temp) file's name, so
    equal tensors would give different bytes."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def atomic_torch_save(path: str | os.PathLike, obj: Any) -> Path:
    """``torch.save`` written atomically; equal objects give equal bytes."""
    return atomic_write_bytes(path, torch_bytes(obj))


def _strip_zip_times(data: bytes) -> bytes:
    """numpy stamps the current time into the zip entries; rewrite them with a fixed time (same seed ⇒ same bytes)."""
    src = zipfile.ZipFile(io.BytesIO(data))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            fixed = zipfile.ZipInfo(info.filename, date_time=(1980, 1, 1, 0, 0, 0))
            fixed.compress_type = zipfile.ZIP_DEFLATED
            fixed.external_attr = info.external_attr
            dst.writestr(fixed, src.read(info.filename))
    return out.getvalue()


PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"


def is_complete(path: Path) -> bool:
    """Whether a cache file is whole, from its last bytes: npz / torch files end with a zip directory, PNGs
    with IEND, JSON parses; other files are whole when not empty."""
    suffix = path.suffix
    try:
        if suffix in (".npz", ".pt", ".pth"):
            return zipfile.is_zipfile(path)
        if suffix == ".png":
            with open(path, "rb") as f:
                f.seek(max(0, path.stat().st_size - len(PNG_END)))
                return f.read() == PNG_END
        if suffix == ".json":
            json.loads(path.read_text())
            return True
        return path.stat().st_size > 0
    except (OSError, ValueError):
        return False


def load_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
    path = Path(path)
    if not path.is_file():
        raise FmalibError(f"cache file {path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except Exception as exc:  # a corrupt cache file must say which file
        raise FmalibError(f"cache file {path} is not a readable npz ({exc}); delete it to recompute") from exc


def _finite(obj: Any) -> Any:
    """NaN / ±inf -> None, NumPy scalars and arrays -> Python values, recursively (JSON has no NaN)."""
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _finite(obj.tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    return obj


def strict_json(obj: Any, **kwargs: Any) -> str:
    """``json.dumps`` that writes strict JSON: NaN and infinities become null (a missing number), never ``NaN``."""
    return json.dumps(_finite(obj), allow_nan=False, **kwargs)


def stable_hash(obj: Any, length: int = 16) -> str:
    """Hash of a JSON-able object (dict keys sorted; paths and numpy scalars as strings)."""
    blob = json.dumps(obj, sort_keys=True, default=str, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:length]


def file_fingerprint(path: str | os.PathLike | None) -> dict | None:
    """What identifies a file's content in cache keys: its SHA-256 up to 256 MB (tiny models, contexts), size +
    mtime above (hashing a 2.5 GB SAM ViT-H on every run would cost more than the stage it keys)."""
    if path is None:
        return None
    st = Path(path).stat()
    if st.st_size <= 256 * 2**20:
        return {"sha256": _sha256(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)}
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


@functools.lru_cache(maxsize=256)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    """A file's SHA-256, hashed once per process while its size and mtime stay (every stage start keys the
    same checkpoints)."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def files_fingerprint(named: Mapping[str, Path] | Sequence[tuple[str, Path]], index_path: str | os.PathLike) -> str:
    """SHA-256 over the contents of ``named`` files: {stable name: path} (order-free), or a sequence of
    (name, path) pairs hashed in their order, repeats included (a split: its order and repeats change what
    trains on it). A missing file counts as "missing".

    Hashing every image of a split on every run would cost more than some stages, so each file's digest is
    kept in ``index_path`` with its size and mtime and recomputed only when those change: a moved or copied
    dataset with the same content gives the same fingerprint (the names, not the paths, enter the hash)."""
    index_path = Path(index_path)
    index = json.loads(index_path.read_text()) if index_path.is_file() else {}
    pairs = sorted(named.items()) if isinstance(named, Mapping) else list(named)
    seen, h = {}, hashlib.sha256()
    for name, path in pairs:
        path = Path(path)
        try:
            st = path.stat()
        except FileNotFoundError:
            digest = "missing"
        else:
            old = index.get(name)
            digest = old[2] if old and old[:2] == [st.st_size, st.st_mtime_ns] else \
                hashlib.sha256(path.read_bytes()).hexdigest()
            seen[name] = [st.st_size, st.st_mtime_ns, digest]
        h.update(f"{name}\0{digest}\n".encode())
    if any(index.get(k) != v for k, v in seen.items()):
        atomic_write_text(index_path, json.dumps({**index, **seen}, sort_keys=True))
    return h.hexdigest()[:32]


def is_stray(path: Path) -> bool:
    """A hidden file or one of ``atomic_path``'s temp files (what a kill between write and rename leaves)."""
    return path.name.startswith(".") or ".tmp" in path.name


def stray_files(path: str | os.PathLike, pattern: str = "*") -> list[Path]:
    """The hidden and temporary files of a folder matching ``pattern`` (left out of fingerprints)."""
    return sorted(p for p in Path(path).glob(pattern) if is_stray(p))


def dir_fingerprint(path: str | os.PathLike, pattern: str = "*.png") -> str:
    """SHA-256 over the names and contents of a folder's files matching ``pattern`` (e.g. a seed folder);
    hidden and temporary files are not part of it (``stray_files``)."""
    h = hashlib.sha256()
    for p in sorted(p for p in Path(path).glob(pattern) if not is_stray(p)):
        h.update(p.name.encode())
        h.update(hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()


class StageCache:
    """Per-item results of one stage, keyed by (stage inputs + params + the code of module ``code``).

    ``reason`` says why the directory is new (None when it existed): which key parts differ from the
    stage's most recent other cache, so a log line can say what a recomputation answers."""

    last: "StageCache | None" = None  # the most recently opened cache: what an interrupted run kept

    def __init__(self, root: str | os.PathLike, stage: str, key_obj: Any, code: str):
        self.stage = stage
        manifest = code_manifest(code)
        self.key = stable_hash({"key": key_obj, "code": manifest})
        self.dir = Path(root) / stage / self.key
        meta = self.dir / "key.json"
        self.reason = None if meta.is_file() else _why_new(self.dir.parent, key_obj, manifest)
        make_dir(self.dir)
        StageCache.last = self
        if not meta.exists():
            atomic_write_text(meta, strict_json({"stage": stage, "key": key_obj, "code": manifest},
                                               sort_keys=True, indent=1, default=str))

    def status(self, n_todo: int, n_total: int, force: bool = False) -> str:
        """One line for the stage's log: reused, or computing how many and why."""
        if n_todo == 0:
            return f"reused {n_total} cached in {self.dir}"
        done = n_total - n_todo
        why = "forced" if force else f"new cache: {self.reason}" if self.reason else \
            f"resuming: {done} already cached" if done else "nothing cached yet under this key"
        return f"computing {n_todo} of {n_total} into {self.dir} ({why})"

    def path(self, item_id: str, ext: str = ".npz") -> Path:
        return self.dir / f"{item_id}{ext}"

    def has(self, item_id: str, ext: str = ".npz") -> bool:
        """Whether the item is cached, whole: a truncated file (copied or damaged after its atomic write) is
        removed, with a log line, and counts as not cached, so the stage recomputes it."""
        path = self.path(item_id, ext)
        if not path.is_file():
            return False
        if is_complete(path):
            return True
        log.warning("cache file %s is incomplete (truncated?): removing it; it is recomputed", path)
        path.unlink(missing_ok=True)
        return False

    def claim_each(self, ids: Sequence[str], ext: str = ".npz", force: bool = False,
                   poll_s: float = 0.5) -> Iterator[str]:
        """The ids this process computes, each under its lock while the caller computes it: ids already
        cached are skipped (unless ``force``), ids another live process holds are left to it and waited
        for at the end (one log line), and taken over if it stops without writing them."""
        pending, first_pass = list(ids), True
        while pending:
            waiting = []
            for item_id in pending:
                if (first_pass and force) or not self.has(item_id, ext):  # later passes: another process's result
                    if try_lock(self.path(item_id, ext)):
                        yield from self._locked(item_id, ext)
                    else:
                        waiting.append(item_id)
            if waiting and first_pass:
                log.info("%s: waiting for %d item(s) another process is computing (%s) in %s", self.stage,
                         len(waiting), holders([self.path(i, ext) for i in waiting]), self.dir)
            elif waiting:
                time.sleep(poll_s)
            pending, first_pass = waiting, False

    @contextlib.contextmanager
    def exclusive(self, item_id: str, ext: str, poll_s: float = 0.5) -> Iterator[None]:
        """Hold the item's lock for the block, waiting (one log line) while another live process holds it."""
        path = self.path(item_id, ext)
        if not try_lock(path):
            log.info("%s: waiting for another process (%s) computing %s", self.stage, holders([path]), path)
            while not try_lock(path):
                time.sleep(poll_s)
        try:
            yield
        finally:
            unlock(path)

    def _locked(self, item_id: str, ext: str) -> Iterator[str]:
        try:
            yield item_id
        finally:
            unlock(self.path(item_id, ext))

    def save_npz(self, item_id: str, **arrays: np.ndarray) -> Path:
        return atomic_save_npz(self.path(item_id), **arrays)

    def load_npz(self, item_id: str) -> dict[str, np.ndarray]:
        return load_npz(self.path(item_id))

    def done_ids(self, ext: str = ".npz") -> set[str]:
        return {p.name[: -len(ext)] for p in self.dir.glob(f"*{ext}") if not p.name.startswith(".")}


def _differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted paths where two JSON-able key objects differ."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [d for k in sorted(set(old) | set(new), key=str)
                for d in _differences(old.get(k), new.get(k), f"{prefix}{k}.")]
    return [] if json.dumps(old, default=str) == json.dumps(new, default=str) else [prefix.rstrip(".") or "key"]


def _why_new(stage_dir: Path, key_obj: Any, manifest: dict) -> str:
    """What differs from the stage's most recently written other cache (its key.json)."""
    metas = sorted(stage_dir.glob("*/key.json"), key=lambda p: p.stat().st_mtime_ns) if stage_dir.is_dir() else []
    if not metas:
        return "no earlier cache of this stage"
    try:
        last = json.loads(metas[-1].read_text())
    except (OSError, ValueError):
        return "the last cache's key.json is unreadable"
    code = last.get("code")
    parts = [f"code changed: {', '.join(changed_modules(code, manifest)) or 'none'}"] \
        if isinstance(code, dict) and code != manifest else ["code changed"] if code != manifest else []
    diffs = _differences(json.loads(strict_json(last.get("key"), default=str)),
                         json.loads(strict_json(key_obj, default=str)))
    if diffs:
        parts.append("key changed: " + ", ".join(diffs[:6]) + (f" (+{len(diffs) - 6} more)" if len(diffs) > 6 else ""))
    return "; ".join(parts) or f"same key as {metas[-1].parent.name}"
