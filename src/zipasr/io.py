"""Atomic file writes: a stage killed half-way never leaves a half-written output behind.

An output is written under a hidden temporary sibling name, ``.{name}.{host}.{pid}.{random}
.partial[suffix]``, and renamed onto its final name when complete. A writer killed with SIGKILL
cannot remove its temporaries; the next atomic write of the same final name removes those whose
writer (same host, by process id) no longer runs, so reruns never accumulate them. Temporaries
of another host's writers are left alone: their liveness cannot be checked from here.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

_HOST = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname()) or "localhost"
# What follows ".{name}" in a temporary's name (mkstemp/mkdtemp add 8 random characters).
_TEMP_TAIL = re.compile(r"\.(?P<host>[A-Za-z0-9-]+)\.(?P<pid>\d+)\.[a-z0-9_]{8}\.partial")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _publish_mode(path: Path, directory: bool = False) -> None:
    """The mode a plain ``open``/``mkdir`` would have given (0666/0777 less the umask):
    mkstemp/mkdtemp create 0600/0700, which would hide outputs from a shared cluster group."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


def _temp_prefix(path: Path) -> str:
    # host and pid: what the next writer of the same name needs to tell a dead writer's file
    return f".{path.name}.{_HOST}.{os.getpid()}."


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Remove the temporaries of ``path`` left by writers on this host that no longer run (a
    SIGKILL skips the cleanup); returns them. Live writers' temporaries are kept."""
    path = Path(path)
    lead = f".{path.name}"
    removed = []
    try:
        entries = list(os.scandir(path.parent))
    except FileNotFoundError:
        return removed
    for entry in entries:
        m = _TEMP_TAIL.match(entry.name, len(lead)) if entry.name.startswith(lead) else None
        if m is None or m["host"] != _HOST or _alive(int(m["pid"])):
            continue
        stale = Path(entry.path)
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)
        removed.append(stale)
    return removed


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary sibling of ``path``; rename it onto ``path`` only if the block succeeds.

    The temporary name keeps the final suffixes (``.jsonl.gz`` etc.), so writers that pick a
    format from the extension (lhotse's ``to_file``) behave as for the final name.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    suffix = suffix if suffix is not None else "".join(path.suffixes)
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path), suffix=f".partial{suffix}",
                               dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if tmp_path.exists():
            _publish_mode(tmp_path)
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling directory; it replaces ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    tmp_path = Path(tempfile.mkdtemp(prefix=_temp_prefix(path), suffix=".partial",
                                     dir=path.parent))
    try:
        yield tmp_path
        _publish_mode(tmp_path, directory=True)
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            shutil.rmtree(tmp_path)


@contextlib.contextmanager
def scratch_dir(path: str | os.PathLike) -> Iterator[Path]:
    """A scratch directory next to ``path`` (for a stage's intermediate files), removed on exit;
    named as ``path``'s temporaries, so after a kill the next atomic write of ``path`` removes
    it. Unlike the system's temporary directory, nothing is left behind by a SIGKILL."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = Path(tempfile.mkdtemp(prefix=_temp_prefix(path), suffix=".partial",
                                     dir=path.parent))
    try:
        yield tmp_path
    finally:
        shutil.rmtree(tmp_path, ignore_errors=True)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def file_md5(path: str | os.PathLike) -> str:
    """The file's MD5, read in 1 MiB blocks. It is also DVC's hash of a file (as in dvc.lock)."""
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
