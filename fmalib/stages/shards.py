"""Shards of a split: shard (i, n) takes items i, i + n, i + 2n, … so the n shards of a run partition it.

An image stage given no shard takes it from its launcher (``resolve_shard``): ``torchrun --nproc_per_node=N``
(RANK / WORLD_SIZE; the device ``cuda`` becomes ``cuda:LOCAL_RANK``, ``launcher_device``) or a SLURM array
(SLURM_ARRAY_TASK_ID / _COUNT / _MIN / _STEP); torchrun inside an array task splits the task's share again.
No process group is needed: shards write different per-image files into the same cache. A stage that needs a
complete upstream cache refuses an incomplete one (``require_cached``), naming the command that fills it.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Mapping

from ..core.errors import FmalibError
from ..core.params import repo_root


def check_shard(shard) -> tuple[int, int]:
    """(i, n) as ints with 0 <= i < n, or an error naming the shard."""
    try:
        i, n = shard
    except (TypeError, ValueError):
        raise FmalibError(f"shard {shard!r}: expected (i, n) with 0 <= i < n") from None
    if not (isinstance(i, int) and isinstance(n, int) and 0 <= i < n):
        raise FmalibError(f"shard {shard!r}: expected (i, n) with 0 <= i < n")
    return i, n


def shard_indices(n_items: int, shard: tuple[int, int]) -> list[int]:
    """Items i, i + n, i + 2n, ... of shard (i, n)."""
    i, n = check_shard(shard)
    return list(range(i, n_items, n))


def _env_int(env: Mapping[str, str], name: str) -> int:
    try:
        return int(env[name])
    except ValueError:
        raise FmalibError(f"environment variable {name}={env[name]!r} is not an integer") from None


def _torchrun_shard(env: Mapping[str, str]) -> tuple[int, int] | None:
    if "RANK" not in env or "WORLD_SIZE" not in env:
        return None
    rank, world = _env_int(env, "RANK"), _env_int(env, "WORLD_SIZE")
    if not 0 <= rank < world:
        raise FmalibError(f"torchrun: RANK={rank} is not in 0..WORLD_SIZE-1 (WORLD_SIZE={world})")
    return rank, world


def _slurm_array_shard(env: Mapping[str, str]) -> tuple[int, int] | None:
    if "SLURM_ARRAY_TASK_ID" not in env:
        return None
    if "SLURM_ARRAY_TASK_COUNT" not in env:
        raise FmalibError("SLURM array: SLURM_ARRAY_TASK_ID is set but SLURM_ARRAY_TASK_COUNT is not; "
                          "pass --shard i/n explicitly")
    task, count = _env_int(env, "SLURM_ARRAY_TASK_ID"), _env_int(env, "SLURM_ARRAY_TASK_COUNT")
    first = _env_int(env, "SLURM_ARRAY_TASK_MIN") if "SLURM_ARRAY_TASK_MIN" in env else 0
    step = _env_int(env, "SLURM_ARRAY_TASK_STEP") if "SLURM_ARRAY_TASK_STEP" in env else 1
    i, rest = divmod(task - first, max(step, 1))
    if rest or not 0 <= i < count:
        raise FmalibError(f"SLURM array: task {task} of {count} (min {first}, step {step}) does not map to a shard "
                          f"0..{count - 1}; use an array like --array=0-{count - 1} or pass --shard i/n explicitly")
    return i, count


def launcher_shard(env: Mapping[str, str] | None = None) -> tuple[int, int] | None:
    """This process's shard (i, n) as its launcher set it, or None outside one.

    torchrun: (RANK, WORLD_SIZE). SLURM array: ((SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN) / STEP,
    SLURM_ARRAY_TASK_COUNT). Both (torchrun in each array task): (task * WORLD_SIZE + RANK, count * WORLD_SIZE).
    """
    env = os.environ if env is None else env
    ranks, tasks = _torchrun_shard(env), _slurm_array_shard(env)
    if ranks is None:
        return tasks
    if tasks is None:
        return ranks
    return tasks[0] * ranks[1] + ranks[0], tasks[1] * ranks[1]


def resolve_shard(shard: tuple[int, int] | None = None, env: Mapping[str, str] | None = None) -> tuple[int, int]:
    """An explicit shard wins; else the launcher's (``launcher_shard``); else (0, 1), the whole split."""
    if shard is not None:
        return check_shard(shard)
    return launcher_shard(env) or (0, 1)


def launcher_device(device: str, env: Mapping[str, str] | None = None) -> str:
    """``cuda`` under torchrun is this process's GPU, ``cuda:LOCAL_RANK``; any other device stays as it is
    (``cpu``, an explicit ``cuda:N``; a SLURM task sees its own GPUs through CUDA_VISIBLE_DEVICES)."""
    env = os.environ if env is None else env
    if device == "cuda" and "LOCAL_RANK" in env:
        return f"cuda:{_env_int(env, 'LOCAL_RANK')}"
    return device


def fill_command(params, subcommand: str, split: str | None = None) -> str:
    """The CLI line that fills a stage's cache for these params (its overrides are the caller's to repeat)."""
    path = getattr(params, "path", None)
    where = "<params.yaml>" if path is None else str(path)
    if path is not None and Path(path).resolve().is_relative_to(repo_root()):
        where = str(Path(path).resolve().relative_to(repo_root()))
    line = f"python -m fmalib {subcommand} --params {where}"
    return line + (f" --split {split}" if split and subcommand == "masks" else "")


def require_cached(cache, ids: Iterable[str], what: str, how: str, ext: str = ".npz", show: int = 5) -> None:
    """Refuse an incomplete upstream cache: how many of ``ids`` lack their file, which (the first ``show``),
    where, and ``how`` (a command or call) fills them — in one process or in any shards — before a rerun."""
    ids = list(ids)
    missing = [i for i in ids if not cache.has(i, ext)]
    if not missing:
        return
    listed = ", ".join(repr(i) for i in missing[:show]) + (", …" if len(missing) > show else "")
    raise FmalibError(f"{what} of {len(missing)} / {len(ids)} images are not cached in {cache.dir} (missing: "
                      f"{listed}); fill them with {how} (in one process or in shards: torchrun, a SLURM array; "
                      f"with this run's --set / --fast options), then rerun")
