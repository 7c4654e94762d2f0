"""One run per output directory: a lock that dies with its process, and which command owns a directory.

Every command that writes an output directory (``moelens trace``, ``merge``, ``demo``, ``audit``, and
the library functions behind them: :func:`~moelens.tracing.protocol.run_protocol`,
:func:`~moelens.tracing.protocol.merge`, :func:`~moelens.demo.run_demo`,
:func:`~moelens.audit.run.run_audit`, ...) first *claims* it with :func:`claim`:

* ``--out`` naming a file (or a path under a file): :class:`RunDirError`, nothing created.
* A directory holding another command's results (a ``moelens demo`` directory given to
  ``moelens trace``, a trace directory given to ``moelens demo``, ...): :class:`RunDirError`, nothing
  touched. ``merge`` only takes a ``moelens trace`` directory.
* The lock: ``DIR/.moelens.lock``, held with an exclusive, non-blocking ``flock`` for the whole
  command. The operating system drops the lock when the process ends, however it ends (an
  exception, Ctrl-C, ``kill -9``, a crash), so a crashed run never leaves the directory locked; no
  pid check or timeout is involved. The file itself stays: its JSON names the command whose
  results the directory holds (``owner``) and who last held it (command, pid, host, start time).
* A second run into a directory in use does **not** wait: it refuses at once with one line
  naming the holder (the command line exits with status 2), before it writes anything. Rerun it
  when the first has finished (a ``moelens trace`` rerun then resumes), or use another ``--out``.
* Several processes of one launch (``torchrun`` / ``accelerate launch``, ``RANK``/``WORLD_SIZE`` in
  the environment): rank 0 holds ``.moelens.lock``, rank ``r > 0`` holds ``.moelens.rank{r}.lock``
  and then waits until ``.moelens.lock`` names its own launch (``MASTER_ADDR``/``MASTER_PORT``,
  ``TORCHELASTIC_RUN_ID``/restart count, or ``MOELENS_RUN_ID``); a rank of another launch refuses. So
  two launches into one directory, or a launch and a single-process run, never both write.

Claims are re-entrant within a thread (the command line claims before loading the model, the
library function it calls claims again); another thread or process is refused. ``flock`` works on
local file systems and on NFS (Linux emulates it with NFS byte-range locks); where ``fcntl`` is
missing (Windows) ``msvcrt.locking`` plays the same role.
"""

from __future__ import annotations

import functools
import inspect
import json
import os
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

from moelens.errors import MoelensUserError

LOCK = ".moelens.lock"
COMMANDS = ("trace", "audit", "demo")  # the commands that own a directory (merge works on a trace's)

# a directory written before the lock file existed: which command's files it holds (first match wins)
_SIGNATURES = (
    ("trace", ("screen.jsonl", "screen.rank*.jsonl", "experts.jsonl", "experts.rank*.jsonl")),
    ("audit", ("effects.jsonl", "stats.json", "pairs.csv", "pooled.csv", "*_settings.json")),
)


# files of an earlier run that would mislead this one: the file barriers' markers of `moelens trace` ranks
_STALE = {"trace": (".screen.rank*.done", ".experts.rank*.done")}


class RunDirError(MoelensUserError):
    """The output directory cannot be used: it is a file, holds another command's results, or
    another run is writing into it. The message says which and what to do."""


_held: dict[str, "_Lock"] = {}
_held_guard = threading.Lock()


class _Lock:
    def __init__(self, fd: int, path: Path, owner: str, thread: int):
        self.fd, self.path, self.owner, self.thread, self.depth = fd, path, owner, thread, 1


def _try_lock(fd: int) -> bool:
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        import msvcrt

        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
            return True
        except OSError:
            return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except (BlockingIOError, PermissionError):
        return False
    except OSError as exc:  # ENOLCK, EOPNOTSUPP: no locks here; refuse rather than run unprotected
        raise RunDirError(f"the file system of this output directory does not support file locks ({exc}); "
                          f"use a directory on a local disk for --out") from None


def _unlock(fd: int) -> None:
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        import msvcrt

        os.lseek(fd, 0, 0)
        msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)
        return
    fcntl.flock(fd, fcntl.LOCK_UN)


def _read(path: Path) -> dict:
    try:
        info = json.loads(path.read_text() or "{}")
        return info if isinstance(info, dict) else {}
    except (OSError, ValueError):
        return {}


def _write(fd: int, info: dict) -> None:
    data = (json.dumps(info, indent=1) + "\n").encode()
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, data)
    os.lseek(fd, 0, os.SEEK_SET)


def launch_id(world_size: int) -> str:
    """What the processes of one launch share (and another launch does not)."""
    env = os.environ
    if world_size <= 1:
        return f"{socket.gethostname()}:{os.getpid()}:{time.time_ns()}"
    if env.get("MOELENS_RUN_ID"):
        return f"run:{env['MOELENS_RUN_ID']}"
    if env.get("MASTER_ADDR"):
        keys = ("MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT")
        return "torch:" + ":".join(env.get(k, "") for k in keys) + f":{world_size}"
    return f"local:{socket.gethostname()}:{os.getppid()}:{world_size}"  # ranks started by one parent


def results_of(directory) -> Optional[str]:
    """Which command's results ``directory`` holds (``"trace"``, ``"audit"``, ``"demo"``), or None
    (empty, missing, or none of moelens' files)."""
    d = Path(directory)
    if not d.is_dir() or all(p.name.startswith(".moelens") and p.name.endswith(".lock") for p in d.iterdir()):
        return None  # nothing but lock files: a run that stopped before writing anything
    owner = _read(d / LOCK).get("owner")
    if owner in COMMANDS:
        return owner
    for command, patterns in _SIGNATURES:
        if any(next(d.glob(p), None) is not None for p in patterns):
            return command
    settings = _read(d / "settings.json")
    if settings:
        return "trace" if "format" in settings and "n_cases" in settings else "audit"
    if (d / "report.html").is_file():
        return "demo"
    return None


def _describe(info: dict) -> str:
    if not info.get("pid"):
        return "another moelens run"
    started = info.get("started")
    when = time.strftime(" since %Y-%m-%d %H:%M:%S UTC", time.gmtime(started)) if started else ""
    rank = f" rank {info['rank']}" if info.get("world_size", 1) > 1 else ""
    return f"`moelens {info.get('command', '?')}`{rank} (pid {info['pid']} on {info.get('host', '?')}{when})"


def _check_path(path: Path, command: str, owner: str, must_exist: bool) -> None:
    if path.exists() and not path.is_dir():
        raise RunDirError(f"--out {path} is a file, not a directory: name a new directory (or one that holds "
                          f"`moelens {owner}` results) for the results")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise RunDirError(f"--out {path}: {parent} is a file, not a directory")
            break
    if must_exist and not path.is_dir():
        raise RunDirError(f"{path}: no such directory (give the --out directory of a `moelens {owner}` run)")
    found = results_of(path)
    if found is not None and found != owner:
        what = "a `moelens trace` output directory" if command == "merge" else f"`moelens {command}`'s results"
        raise RunDirError(f"{path} holds the results of `moelens {found}`; `moelens {command}` does not write into "
                          f"another command's directory: give {what} a new --out directory")


@contextmanager
def claim(out_dir, command: str, *, owner: Optional[str] = None, rank: Optional[int] = None,
          world_size: Optional[int] = None, must_exist: bool = False, launch: Optional[str] = None,
          wait_for_rank0: float = 600.0, stale: tuple = ()) -> Iterator[Path]:
    """Hold ``out_dir`` for ``command`` (see the module docstring); yields the directory.

    ``owner``: the command whose results the directory holds (default ``command``; ``merge`` works
    on ``"trace"`` directories). ``rank``/``world_size``: default from ``RANK``/``WORLD_SIZE``.
    ``must_exist``: refuse a missing directory instead of creating it. ``launch``: the launch id
    shared by the ranks (default :func:`launch_id`). ``wait_for_rank0``: how long a rank > 0 waits
    for rank 0 of its launch to claim the directory. ``stale``: glob patterns of files a previous
    run may have left (barrier markers) that rank 0 removes once it holds the lock, before any other
    rank of its launch goes on."""
    owner = owner or command
    stale = tuple(stale) or _STALE.get(owner, ())
    rank = int(os.environ.get("RANK", 0)) if rank is None else rank
    world_size = int(os.environ.get("WORLD_SIZE", 1)) if world_size is None else world_size
    path = Path(out_dir)
    key = os.path.realpath(path)
    me = threading.get_ident()
    with _held_guard:
        held = _held.get(key)
        if held is not None and held.thread == me:
            if held.owner != owner:
                raise RunDirError(f"{path} is held for `moelens {held.owner}` results by this process; "
                                  f"`moelens {command}` cannot write `moelens {owner}` results there")
            held.depth += 1
    if held is not None and held.thread == me:
        try:
            yield path
        finally:
            held.depth -= 1
        return

    _check_path(path, command, owner, must_exist)
    path.mkdir(parents=True, exist_ok=True)
    name = LOCK if rank == 0 else f".moelens.rank{rank}.lock"
    fd = os.open(path / name, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        # a rank > 0 retries for a moment: rank 0 of its launch may be probing the rank locks
        deadline = time.monotonic() + (2.0 if rank else 0.0)
        while not _try_lock(fd):
            if time.monotonic() >= deadline:
                raise RunDirError(f"{path} is in use by {_describe(_read(path / name))}: one run per directory; "
                                  f"wait until it has finished (a trace rerun then resumes), or use another --out")
            time.sleep(0.05)
        launch = launch or launch_id(world_size)
        info = {"owner": owner, "command": command, "pid": os.getpid(), "host": socket.gethostname(),
                "started": time.time(), "launch": launch, "rank": rank, "world_size": world_size}
        if rank == 0:
            old = results_of(path)
            if old is not None and old != owner:  # written between the check above and the lock
                raise RunDirError(f"{path} holds the results of `moelens {old}`; use another --out directory")
            _check_other_ranks(path, launch)
            for pattern in stale:
                for f in path.glob(pattern):
                    f.unlink()
            _write(fd, info)
        else:
            _write(fd, info)
            _wait_for_rank0(path, launch, wait_for_rank0)
    except BaseException:
        os.close(fd)  # closing drops the lock
        raise
    lock = _Lock(fd, path, owner, me)
    with _held_guard:
        _held[key] = lock
    try:
        yield path
    finally:
        with _held_guard:
            _held.pop(key, None)
        try:
            _unlock(fd)
        finally:
            os.close(fd)


def _check_other_ranks(path: Path, launch: str) -> None:
    """Rank 0: refuse while a rank of another launch still holds its lock in ``path``."""
    for f in sorted(path.glob(".moelens.rank*.lock")):
        fd = os.open(f, os.O_RDWR)
        try:
            if _try_lock(fd):
                _unlock(fd)
                continue
        finally:
            os.close(fd)
        deadline = time.monotonic() + 1.0  # a rank of this launch may not have written its launch yet
        while _read(f).get("launch") != launch and time.monotonic() < deadline:
            time.sleep(0.05)
        info = _read(f)
        if info.get("launch") != launch:
            raise RunDirError(f"{path} is in use by {_describe(info)}: one run per directory; wait until it "
                              f"has finished, or use another --out")


def _wait_for_rank0(path: Path, launch: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while _read(path / LOCK).get("launch") != launch:
        if time.monotonic() >= deadline:
            raise RunDirError(f"{path}: rank 0 of this launch did not claim the directory within {timeout:.0f}s; "
                              f"it is held by {_describe(_read(path / LOCK))}: use another --out")
        time.sleep(0.05)


def holds_run_dir(command: str, arg: str = "out_dir", **options):
    """Decorator: the function holds its ``arg`` directory (when not None) for ``command`` while it
    runs (:func:`claim` with ``options``)."""

    def wrap(fn):
        sig = inspect.signature(fn)

        @functools.wraps(fn)
        def inner(*args, **kwargs):
            out = sig.bind(*args, **kwargs).arguments.get(arg)
            if out is None:
                return fn(*args, **kwargs)
            with claim(out, command, **options):
                return fn(*args, **kwargs)

        return inner

    return wrap
