"""The one exception type fmalib raises for bad input (files, keys, paths, checkpoints)."""


class FmalibError(Exception):
    """Bad input: the message names the file, key or path and what was expected."""
