"""Files: atomic writes, temporaries left by crashes, and the checks an output path passes
before any work starts.

**Atomic writes.** ``atomic_dir`` and ``atomic_file`` write into a hidden temporary beside
the target, fsync it, and rename it into place; replacing an existing directory swaps the
two in one ``renameat2(RENAME_EXCHANGE)`` where the filesystem supports it, so there is never
a moment with neither the old nor the new one. A failed write (``OSError``, or the
``SafetensorError`` / ``RuntimeError`` that safetensors and ``torch.save`` raise on a full disk)
becomes one ``DiskError`` line naming the path and the space needed.

**Temporaries** are named ``.NAME.tmp-HOST-PID`` (``.NAME.old-HOST-PID`` for a directory being
replaced), so a later process can tell a dead writer's leftovers from a live one's work.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import shutil
import socket
import sys
from pathlib import Path
from typing import Iterator, Optional, Sequence, Union

from .errors import DiskError, LatentflowError

__all__ = [
    "ASSETS",
    "HOST",
    "atomic_dir",
    "atomic_file",
    "check_output",
    "file_digest",
    "file_sha256",
    "remove_stale_temps",
    "temp_name",
    "write_text_atomic",
]

HOST = socket.gethostname().split(".")[0].replace("-", "_") or "host"
ASSETS = Path(__file__).resolve().parent / "assets"

FIX = "free some space or write elsewhere"  # what a failed write suggests, unless the caller knows its flag
FIX_RUN = FIX + " (--output-dir)"
FIX_CACHE = FIX + " (--cache-dir)"

_TEMP = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<host>[A-Za-z0-9_]+)-(?P<pid>\d+)$")


def temp_name(final: Path, kind: str = "tmp") -> Path:
    return final.parent / f".{final.name}.{kind}-{HOST}-{os.getpid()}"


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # our own leftovers are never in use
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def discard(path: Path) -> None:
    """Remove a temporary: a directory tree, or a file or link (a replaced symlink lands here
    as a link; its target is left alone)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()


def remove_stale_temps(directory: Path, any_owner: bool = False) -> int:
    """Remove temporaries that crashed or killed writers left in ``directory``; put back a
    directory whose replacement was cut off between its two renames. ``any_owner``: the
    caller is the only writer (it holds the run lock), so every temporary is stale."""
    removed = 0
    if not directory.is_dir():
        return 0
    for entry in directory.iterdir():
        m = _TEMP.match(entry.name)
        legacy = entry.name.startswith(".") and entry.name.endswith(".tmp")  # earlier releases' temps
        if not m and not legacy:
            continue
        if m and not any_owner and (m["host"] != HOST or _pid_alive(int(m["pid"]))):
            continue  # another live writer's work in progress
        if legacy and not any_owner:
            continue
        final = directory / m["name"] if m else None
        if m and m["kind"] == "old" and final is not None and not final.exists():
            os.replace(entry, final)  # the new one never arrived: keep the old one
            continue
        discard(entry)
        removed += 1
    return removed


def _clear_dead_temps(final: Path) -> None:
    """Remove this target's temporaries whose writer died on this host (a killed
    ``export --overwrite`` leaves a full-size one), before writing it again."""
    if not final.parent.is_dir():
        return
    for entry in final.parent.glob(f".{final.name}.tmp-{HOST}-*"):
        m = _TEMP.match(entry.name)
        if m and m["name"] == final.name and not _pid_alive(int(m["pid"])):
            discard(entry)


def _fsync_tree(path: Path) -> None:
    paths = [path] if path.is_file() else sorted(path.rglob("*")) + [path]
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


_RENAME_EXCHANGE = 2


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2); False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    rc = fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EXDEV):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _replace(tmp: Path, final: Path) -> None:
    """Move ``tmp`` to ``final``; an existing ``final`` is replaced with no gap."""
    if tmp.is_dir() and final.exists():
        if _exchange(tmp, final):
            discard(tmp)  # now holds the old directory, or the old symlink to one
            return
        old = temp_name(final, "old")
        os.replace(final, old)  # a crash here leaves `old`, which remove_stale_temps puts back
        try:
            os.replace(tmp, final)
        except OSError:
            os.replace(old, final)
            raise
        discard(old)
        return
    os.replace(tmp, final)


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


# What a failed write raises: OSError, safetensors' SafetensorError, and the RuntimeError of
# torch.save ("PytorchStreamWriter failed writing file", "iostream error"). Other errors in
# the body (a bug) pass through as they are.
_TORCH_WRITE_FAILURES = ("PytorchStreamWriter", "file write failed", "unexpected pos", "iostream")


def _write_errors() -> tuple:
    from safetensors import SafetensorError

    return (OSError, RuntimeError, SafetensorError)


def _is_write_failure(exc: BaseException) -> bool:
    if isinstance(exc, OSError):
        return True
    text = str(exc)
    if type(exc).__name__ == "SafetensorError":
        # the writer's I/O errors in their several spellings ("I/O error: File too large (os error 27)")
        return any(s in text for s in ("IoError", "I/O error", "Os {", "os error", "No space"))
    return any(s in text for s in _TORCH_WRITE_FAILURES)


def _reason(exc: BaseException, full: bool) -> str:
    text = str(exc).strip()
    if getattr(exc, "errno", None) == errno.ENOSPC or "No space left" in text or "StorageFull" in text:
        return "No space left on device"
    if full and not isinstance(exc, OSError):  # torch.save says "unexpected pos ..." on a full disk
        return f"No space left on device: {type(exc).__name__}"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return f"{type(exc).__name__}: {text.splitlines()[-1][:160] if text else 'write failed'}"


def _disk_error(what: str, final: Path, exc: BaseException, needed: Optional[int], intact: str, fix: str) -> DiskError:
    try:
        free_bytes = shutil.disk_usage(final.parent if final.parent.exists() else Path.cwd()).free
        free = f"{_human(free_bytes)} free there"
    except OSError:
        free_bytes, free = None, "free space unknown"
    full = free_bytes is not None and free_bytes < max(needed or 0, 1 << 20)
    need = f"needs about {_human(needed)}, " if needed else ""
    return DiskError(f"could not write {what} {final} ({_reason(exc, full)}; {need}{free}); {intact}; {fix}")


@contextlib.contextmanager
def atomic_dir(
    final: Path,
    what: str = "directory",
    needed: Optional[int] = None,
    intact: str = "what was there before is intact",
    fix: str = FIX,
) -> Iterator[Path]:
    """Yield a temporary directory to fill; on success it replaces ``final`` atomically."""
    final = Path(final)
    tmp = temp_name(final)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        _clear_dead_temps(final)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        yield tmp
        _fsync_tree(tmp)
        _replace(tmp, final)
        _fsync_dir(final.parent)
    except _write_errors() as exc:
        written = _size(tmp)
        shutil.rmtree(tmp, ignore_errors=True)
        if not _is_write_failure(exc):
            raise
        raise _disk_error(what, final, exc, needed or written, intact, fix) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_file(
    final: Path,
    what: str = "file",
    needed: Optional[int] = None,
    intact: str = "what was there before is intact",
    fix: str = FIX,
) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces ``final`` atomically."""
    final = Path(final)
    tmp = temp_name(final)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        _clear_dead_temps(final)
        yield tmp
        _fsync_tree(tmp)
        os.replace(tmp, final)
        _fsync_dir(final.parent)
    except _write_errors() as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if not _is_write_failure(exc):
            raise
        raise _disk_error(what, final, exc, needed, intact, fix) from None
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def file_digest(path: Path, algorithm: str = "sha256") -> str:
    """The hex digest of a file's bytes (``hashlib``'s ``algorithm``), read in 1 MiB pieces."""
    import hashlib

    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file's bytes."""
    return file_digest(path, "sha256")


def write_text_atomic(path: Path, text: str, what: str = "file", fix: str = FIX) -> None:
    with atomic_file(path, what, fix=fix) as tmp:
        tmp.write_text(text)


# --- output checks --------------------------------------------------------------------------


def _file_in_the_way(path: Path) -> Optional[Path]:
    """The nearest existing ancestor of ``path`` (or ``path`` itself) if it is a file."""
    for p in [path, *path.parents]:
        if p.exists():
            return p if not p.is_dir() else None
    return None


def _check_writable(path: Path, flag: str) -> None:
    """Refuse a place this process cannot write, before the work that would fill it: a
    file is created and removed in the nearest existing directory."""
    import tempfile

    place = next((p for p in [path.parent, *path.parents] if p.is_dir()), None)
    if place is None:
        return
    try:
        with tempfile.TemporaryFile(dir=place):
            pass
    except OSError as exc:
        raise LatentflowError(
            f"{flag} {path}: {place} is not writable ({exc.strerror}); choose another {flag}"
        ) from None


def check_output(
    out: Union[Path, Sequence[Path]],
    overwrite: bool = False,
    *,
    flag: str = "--out",
    directory: bool = False,
    only_replaces: Optional[str] = None,
    replace_shipped: bool = False,
) -> None:
    """The one check every command runs on where it will write, before any work starts.

    Refused, each in one line that names ``flag``: a path inside latentflow's shipped assets
    (unless the maintainer command asks, ``replace_shipped``); a path under a file; a file
    where a ``directory`` is wanted; existing outputs (a file, or a directory holding files)
    without ``overwrite``; and, with ``only_replaces`` (a marker file such as
    ``model_index.json``), an existing directory without that marker even with ``overwrite``.
    ``out`` may be several paths written together (a grid and its arrays)."""
    paths = [Path(p) for p in ([out] if isinstance(out, (str, Path)) else out)]
    for path in paths:
        resolved = path.resolve()
        if (resolved == ASSETS or ASSETS in resolved.parents) and not replace_shipped:
            raise LatentflowError(
                f"{path} is one of the assets latentflow ships; write elsewhere (the default is under runs/), or "
                "regenerate it with the maintainer command `python experiments/maintainer/regenerate_assets.py`"
            )
        blocker = _file_in_the_way(path.parent if not directory else path)
        if blocker is not None:
            what = "is a file; give a directory" if blocker == path else "is a file, not a directory"
            raise LatentflowError(f"{flag} {path}: {blocker} {what}")
        _check_writable(path, flag)
    existing = [p for p in paths if p.exists() and (not p.is_dir() or any(p.iterdir()))]
    if only_replaces and existing and not (existing[0] / only_replaces).is_file():
        raise LatentflowError(
            f"{flag} {existing[0]} exists and is not what this command writes (no "
            f"{only_replaces}); --overwrite only replaces an earlier output: choose another {flag}"
        )
    if existing and not overwrite:
        names = ", ".join(map(str, existing))
        verb = "already exists" if len(existing) == 1 else "already exist"
        raise LatentflowError(f"{names} {verb}; choose another {flag} or pass --overwrite")
