"""The architecture as tests: no import cycle inside fmalib, and imports inside functions only for optional
dependencies. (The layer contracts themselves are `lint-imports`, which `make test` runs first.)"""
from __future__ import annotations

import ast
from pathlib import Path

import grimp

import fmalib

OPTIONAL = ("detectron2", "pydensecrf", "sam2")  # imported where used, so fmalib works without them
# The command line imports each subcommand's stack when it runs, so `python -m fmalib --help` loads no torch:
# the CLI module, the package it sits in, and the params module it reads (torch only for a CUDA device).
LAZY = ("study/cli.py", "study/__init__.py", "core/params.py")


def import_cycles(package: str) -> list[list[str]]:
    """Strongly connected components (size > 1, or a self-import) of the package's module import graph
    (Tarjan, iterative)."""
    graph = grimp.build_graph(package)
    modules = sorted(graph.modules)
    edges = {m: sorted(graph.find_modules_directly_imported_by(m) & set(modules)) for m in modules}
    index, low, on_stack, stack, out, counter = {}, {}, set(), [], [], [0]
    for root in modules:
        if root in index:
            continue
        work = [(root, 0)]
        while work:
            node, i = work.pop()
            if i == 0:
                index[node] = low[node] = counter[0]
                counter[0] += 1
                stack.append(node)
                on_stack.add(node)
            recurse = False
            for j in range(i, len(edges[node])):
                nxt = edges[node][j]
                if nxt not in index:
                    work.append((node, j + 1))
                    work.append((nxt, 0))
                    recurse = True
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            if recurse:
                continue
            if work and work[-1][0] != node:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                comp = []
                while True:
                    m = stack.pop()
                    on_stack.discard(m)
                    comp.append(m)
                    if m == node:
                        break
                if len(comp) > 1 or node in edges[node]:
                    out.append(sorted(comp))
    return out


def function_level_imports(source: str) -> list[tuple[int, str]]:
    """(line, module) of every import statement inside a function body."""
    found = []
    for fn in ast.walk(ast.parse(source)):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(fn):
                if isinstance(node, ast.Import):
                    found += [(node.lineno, a.name) for a in node.names]
                elif isinstance(node, ast.ImportFrom):
                    found.append((node.lineno, "." * node.level + (node.module or "")))
    return found


def test_cycle_finder_finds_a_planted_cycle(tmp_path, monkeypatch):
    pkg = tmp_path / "cyclepkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from . import b\n")
    (pkg / "b.py").write_text("def f():\n    from . import c\n")  # an import inside a function still counts
    (pkg / "c.py").write_text("from .a import b\n")
    (pkg / "d.py").write_text("from . import a\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert import_cycles("cyclepkg") == [["cyclepkg.a", "cyclepkg.b", "cyclepkg.c"]]


def test_no_import_cycle_inside_fmalib():
    assert import_cycles("fmalib") == []


def test_imports_inside_functions_only_for_optional_dependencies():
    assert function_level_imports("import os\ndef f():\n    import detectron2\n    from .x import y\n") == \
        [(3, "detectron2"), (4, ".x")]
    root = Path(fmalib.__file__).parent
    offenders = [f"{path.relative_to(root.parent)}:{line} imports {mod}"
                 for path in sorted(root.rglob("*.py")) if path.relative_to(root).as_posix() not in LAZY
                 for line, mod in function_level_imports(path.read_text())
                 if mod.split(".")[0] not in OPTIONAL]
    assert offenders == []


def test_method_takes_arguments_not_params():
    """No function or method in fmalib/method takes a params mapping: stages translate params into arguments."""
    offenders = []
    for path in sorted((Path(fmalib.__file__).parent / "method").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                names = [a.arg for a in node.args.args + node.args.kwonlyargs]
                offenders += [f"{path.name}:{node.lineno} {node.name}({n})" for n in names if n in ("params", "cfg")]
    assert not offenders, offenders


def test_the_command_line_help_loads_no_torch():
    import subprocess
    import sys

    code = ("import sys; from fmalib.study.cli import build_parser; build_parser().format_help(); "
            "print(sorted(m for m in ('torch', 'detectron2', 'papermill', 'open_clip') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
