"""The code half of a cache key: a digest of the fmalib source that computes a result.

A result's code is the module that computes it, every fmalib module that module imports directly or
indirectly (the import graph from grimp; imports are at module level, tests/test_architecture.py holds
them there) and the packages enclosing them (their ``__init__`` runs on import). Each file counts by its
syntax tree with docstrings removed: comments, docstrings, blank lines and line wrapping are not edits,
any other change is — a comment rewrite must not cost a rerun of a 40-minute pretraining.

Third-party libraries are not in the key: one study's caches are shared between machines whose builds
differ (a mask shard computed on a GPU box, seeds on a laptop), and those agree within float rounding,
as devices do.
"""
from __future__ import annotations

import ast
import functools
import hashlib
import sys
from pathlib import Path
from typing import Mapping

import grimp

PACKAGE = __name__.split(".")[0]


def _strip_docstrings(tree: ast.AST) -> ast.AST:
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                    and isinstance(body[0].value.value, str):
                node.body = body[1:] or [ast.Pass()]
    return tree


@functools.lru_cache(maxsize=1024)
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    """Digest of one file's code; (size, mtime) in the cache key so an edited file is read again."""
    tree = _strip_docstrings(ast.parse(Path(path).read_bytes(), filename=path))
    return hashlib.sha256(ast.dump(tree, annotate_fields=False).encode()).hexdigest()[:16]


def source_digest(path: str | Path) -> str:
    """The digest of one source file (see the module doc for what counts as an edit)."""
    st = Path(path).stat()
    return _file_digest(str(path), st.st_size, st.st_mtime_ns)


def _package_root() -> Path:
    return Path(sys.modules[PACKAGE].__file__).parent


def _module_file(module: str) -> Path:
    parts = module.split(".")[1:]
    base = _package_root().joinpath(*parts)
    return base / "__init__.py" if (base / "__init__.py").is_file() else base.with_suffix(".py")


@functools.lru_cache(maxsize=4)
def _graph(stamp: tuple) -> grimp.ImportGraph:
    """The package's import graph; ``stamp`` (every file's size and mtime) rebuilds it after an edit."""
    return grimp.build_graph(PACKAGE, cache_dir=None)


def _stamp() -> tuple:
    return tuple((str(p), st.st_size, st.st_mtime_ns) for p in sorted(_package_root().rglob("*.py"))
                 for st in (p.stat(),))


def code_closure(module: str) -> list[str]:
    """The fmalib modules whose code ``module``'s results depend on (sorted): itself, what it imports,
    transitively, and the packages enclosing each."""
    graph = _graph(_stamp())
    if module not in graph.modules:
        raise KeyError(f"{module} is not a module of {PACKAGE}")
    mods = {module} | set(graph.find_upstream_modules(module))
    for m in list(mods):
        parts = m.split(".")
        mods.update(".".join(parts[:i]) for i in range(1, len(parts)))
    return sorted(mods)


def code_manifest(module: str) -> dict[str, str]:
    """{module: digest} over ``code_closure(module)``: the code part of a cache key, per module so that a
    changed key can name the file that changed."""
    return {m: source_digest(_module_file(m)) for m in code_closure(module)}


def code_digest(module: str) -> str:
    """One digest over ``code_manifest(module)`` (for keys that are a single hash)."""
    blob = "".join(f"{m}\0{d}\n" for m, d in code_manifest(module).items())
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def changed_modules(old: Mapping[str, str], new: Mapping[str, str]) -> list[str]:
    """Repo-relative files of the modules whose digest differs between two manifests (added or removed too)."""
    names = sorted(m for m in set(old) | set(new) if old.get(m) != new.get(m))
    return [_relative(m) for m in names]


def _relative(module: str) -> str:
    try:
        return _module_file(module).relative_to(_package_root().parent).as_posix()
    except ValueError:
        return module


def package_digest() -> str:
    """One digest over every module of the package (the study as a whole: ``fmalib.study.reproduce``)."""
    graph = _graph(_stamp())
    blob = "".join(f"{m}\0{source_digest(_module_file(m))}\n" for m in sorted(graph.modules))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
