"""The one exception type fmalib raises for bad input (files, keys, paths, checkpoints)."""
import errno


class FmalibError(Exception):
    """Bad input: the message names the file, key or path and what was expected."""


_IO_HINTS = {
    errno.ENOSPC: "no space left on the device: free some and rerun (finished items are kept)",
    errno.EDQUOT: "disk quota exceeded: free some and rerun (finished items are kept)",
    errno.EROFS: "the file system is read-only: point workdir at a writable folder (--set workdir=DIR)",
    errno.EACCES: "permission denied: make the folder writable or point workdir elsewhere (--set workdir=DIR)",
    errno.EPERM: "operation not permitted: make the folder writable or point workdir elsewhere (--set workdir=DIR)",
}


def io_error(exc: OSError, path, doing: str = "write") -> FmalibError:
    """One error naming the path and what was being done, for an OSError (full disk, read-only, permission)."""
    reason = exc.strerror or str(exc)
    hint = _IO_HINTS.get(exc.errno)
    return FmalibError(f"could not {doing} {path}: {reason}" + (f" — {hint}" if hint else ""))
