"""Writing outputs safely: never half a file, never a user's file replaced unasked, the user's permissions.

Every command and widget that writes goes through these:

* :func:`refuse_existing` stops *before any work* when an output is already there and overwriting was not
  asked for (the message names the file and ``--overwrite``).
* :func:`prepare_folder` creates an output or cache folder, or says in one sentence why it cannot be used
  (a file of that name, a read-only file system, no permission).
* :func:`atomic_write`, :func:`atomic_write_bytes` and :func:`atomic_write_text` write through a temporary
  file beside the target and a rename, and give the file the mode the user's umask asks for (``mkstemp``
  alone makes 0600 files).
* :func:`staged_folder` stages a run's several outputs in a hidden folder inside the output folder and
  moves them into place together at the end, with Ctrl-C held off during the moves: an interrupted run
  leaves the old set of files or the new one, never a mix; with ``replaces``, an earlier run's files that
  the new run does not write go in the same step. :func:`undo_new_folder` removes an output folder that a
  failed run made and left empty.
* :func:`exclusive_lock` is an inter-process lock on a lock file next to what it guards (a feature store),
  so two processes never write one store at once: the second waits, and says once that it waits.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import signal
import tempfile
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from .errors import He2rnaError, He2rnaWarning

__all__ = [
    "OutputError",
    "LockWaitWarning",
    "file_mode",
    "refuse_existing",
    "prepare_folder",
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_text",
    "staged_folder",
    "commit_folder",
    "undo_new_folder",
    "held_interrupts",
    "exclusive_lock",
    "STAGING_PREFIX",
]

# The umask can only be read by setting it, so it is read once, at import, before any worker thread exists.
_UMASK = os.umask(0o022)
os.umask(_UMASK)

STAGING_PREFIX = ".he2rna-staging-"


class OutputError(He2rnaError):
    """An output cannot be written: it exists (and --overwrite was not given), or its folder is unusable."""


class LockWaitWarning(He2rnaWarning):
    """Another process holds the lock of something this one needs; this one waits for it."""


def file_mode() -> int:
    """The mode a new file gets under the user's umask (0666 minus the umask, e.g. 0644)."""
    return 0o666 & ~_UMASK


def _reason(exc: OSError) -> str:
    return exc.strerror or str(exc)


def refuse_existing(paths: Iterable[str | os.PathLike | None], overwrite: bool) -> None:
    """Stop before any work when an output is already there, unless ``overwrite``.

    ``paths``: the files a command writes (a folder's outputs are named by their key files, so that an
    existing folder with other content is fine); None entries are skipped. Raises :class:`OutputError`
    naming the first one found.
    """
    if overwrite:
        return
    for p in paths:
        if p is not None and Path(p).exists():
            raise OutputError(f"{p} exists; pass --overwrite to replace it (nothing was written).")


def prepare_folder(
    path: str | os.PathLike, what: str = "output folder", advice: str = "choose another folder"
) -> Path:
    """Create ``path`` (and its parents) and check that files can be written in it.

    Raises :class:`OutputError` with one sentence when it is a file, or cannot be created or written
    (read-only file system, no permission); ``what`` names it in that sentence ("output folder",
    "feature cache folder", ...) and ``advice`` ends it.
    """
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise OutputError(f"the {what} {path} is a file, not a folder; {advice}.")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise OutputError(f"the {what} {path} cannot be created: a file is in the way; {advice}.") from None
    except OSError as exc:
        raise OutputError(f"the {what} {path} cannot be created ({_reason(exc)}); {advice}.") from None
    try:
        fd, probe = tempfile.mkstemp(prefix=".he2rna-probe-", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise OutputError(f"the {what} {path} is not writable ({_reason(exc)}); {advice}.") from None
    return path


def atomic_write(path: str | os.PathLike, write: Callable[[Path], Any], overwrite: bool = True) -> Path:
    """Write a file through ``write(tmp_path)`` in the same folder and a rename, with the umask's mode.

    Raises :class:`OutputError` when ``path`` exists and not ``overwrite``, or when the folder is missing or
    read-only or the write fails. No temporary file is left behind on any error, Ctrl-C included.
    """
    path = Path(path)
    refuse_existing([path], overwrite)
    if path.is_dir():
        raise OutputError(f"{path} is a folder; give a file name.")
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise OutputError(f"cannot write to {path.parent} ({_reason(exc)}).") from None
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise OutputError(f"cannot write {path} ({_reason(exc)}).") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes, overwrite: bool = True) -> Path:
    """:func:`atomic_write` of bytes, flushed to disk (fsync) before the rename."""

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())

    return atomic_write(path, write, overwrite)


def atomic_write_text(path: str | os.PathLike, text: str, overwrite: bool = True) -> Path:
    """:func:`atomic_write` of UTF-8 text (newlines written as given)."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8", newline=""), overwrite)


@contextlib.contextmanager
def held_interrupts() -> Iterator[None]:
    """Hold off Ctrl-C (SIGINT) inside the block and deliver it, as KeyboardInterrupt, right after.

    Only the main thread can set signal handlers; elsewhere the block runs as is.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[Any] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        raise KeyboardInterrupt


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_staging(folder: Path) -> None:
    """Staging folders left by killed runs (their process is gone) are removed."""
    for p in folder.glob(f"{STAGING_PREFIX}*"):
        try:
            pid = int(p.name[len(STAGING_PREFIX) :].split("-", 1)[0])
        except ValueError:
            continue
        if p.is_dir() and not _pid_alive(pid):
            shutil.rmtree(p, ignore_errors=True)


def commit_folder(
    stage: Path, out: Path, overwrite: bool, replaces: Iterable[str | os.PathLike] = ()
) -> list[Path]:
    """Move every file of ``stage`` to the same relative place in ``out``, together, Ctrl-C held off.

    Nothing is moved when one target exists and not ``overwrite`` (:class:`OutputError`). With
    ``overwrite``, the files of ``replaces`` (an earlier run's outputs, which the new ones replace as a
    whole) that are not among the targets are removed in the same step.
    """
    files = sorted(p for p in stage.rglob("*") if p.is_file())
    targets = [out / p.relative_to(stage) for p in files]
    refuse_existing(targets, overwrite)
    kept = {os.path.abspath(t) for t in targets}
    stale = [Path(p) for p in replaces if overwrite and os.path.abspath(p) not in kept]
    for src in files:
        os.chmod(src, file_mode())
    for target in targets:
        if target.is_dir():
            raise OutputError(f"{target} is a folder; it cannot be replaced by a file.")
    try:
        with held_interrupts():
            for src, target in zip(files, targets, strict=True):
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(src, target)
            for old in stale:
                old.unlink(missing_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot write into {out} ({_reason(exc)}).") from None
    return targets


@contextlib.contextmanager
def undo_new_folder(path: str | os.PathLike) -> Iterator[None]:
    """Inside the block, a folder made at ``path`` (and the missing folders above it) goes again if the
    block fails (Ctrl-C included) and leaves it empty: a failed run leaves no empty output folder."""
    made: list[Path] = []
    folder = Path(path).expanduser().absolute()
    while not os.path.lexists(folder) and folder != folder.parent:
        made.append(folder)  # the deepest first
        folder = folder.parent
    try:
        yield
    except BaseException:
        for folder in made:
            try:
                folder.rmdir()
            except OSError:  # not empty (or never made): kept, and so is what is above it
                break
        raise


@contextlib.contextmanager
def staged_folder(
    out: str | os.PathLike, overwrite: bool = False, replaces: Iterable[str | os.PathLike] = ()
) -> Iterator[Path]:
    """A hidden folder inside ``out`` to write a run's outputs into; they are committed on success.

    On leaving the block normally, :func:`commit_folder` moves them into ``out`` (with ``overwrite``, the
    files of ``replaces`` that the run did not write go in the same step); on any error (Ctrl-C included)
    the staging folder is removed and ``out`` is as it was, or gone again when the run made it. Staging
    inside ``out`` keeps the files on the same file system (so each move is an atomic rename) and needs no
    write access to the folder above.
    """
    with undo_new_folder(out):
        out = prepare_folder(out)
        _remove_stale_staging(out)
        try:
            stage = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{os.getpid()}-", dir=out))
        except OSError as exc:
            raise OutputError(f"the output folder {out} is not writable ({_reason(exc)}).") from None
        try:
            yield stage
            commit_folder(stage, out, overwrite, replaces)
        finally:
            shutil.rmtree(stage, ignore_errors=True)


@contextlib.contextmanager
def exclusive_lock(
    path: str | os.PathLike,
    what: str = "",
    cancelled: Callable[[], None] | None = None,
    poll_s: float = 0.5,
) -> Iterator[bool]:
    """Hold the inter-process lock ``path`` (a lock file) inside the block; yields whether it is held.

    When another process holds it, warns once (:class:`LockWaitWarning`, naming ``what``) and waits,
    calling ``cancelled()`` between polls (it raises to stop waiting). Where the lock file cannot be
    created (a read-only folder) nothing can be written either, so the block runs without the lock and
    yields False: readers of a read-only cache still work.
    """
    from filelock import FileLock, Timeout

    lock = FileLock(str(path))
    held = False
    warned = False
    while not held:
        try:
            lock.acquire(timeout=0 if not warned else poll_s)
            held = True
        except Timeout:
            if not warned:
                warnings.warn(
                    f"another he2rna process is writing {what or Path(path).name}; waiting for it.",
                    LockWaitWarning,
                    stacklevel=3,
                )
                warned = True
            if cancelled is not None:
                cancelled()
        except OSError as exc:
            if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
                break
            raise
    try:
        yield held
    finally:
        if held:
            lock.release()
