"""Atomic writes publish files and directories with the modes a plain open/mkdir gives under the
process umask (mkstemp/mkdtemp would leave 0600/0700: outputs unreadable to a cluster group)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from zipasr.io import atomic_dir, atomic_path, write_text_atomic


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_modes_follow_the_umask(tmp_path: Path, umask: int) -> None:
    old = os.umask(umask)
    try:
        write_text_atomic(tmp_path / "a.txt", "x")
        with atomic_path(tmp_path / "b.bin") as tmp:
            tmp.write_bytes(b"y")
        with atomic_dir(tmp_path / "d") as d:
            (d / "f").write_text("z")
        plain = tmp_path / "plain.txt"
        plain.write_text("p")
        (tmp_path / "plain_dir").mkdir()
    finally:
        os.umask(old)
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)  # noqa: E731
    assert mode(tmp_path / "a.txt") == mode(tmp_path / "b.bin") == mode(plain) == 0o666 & ~umask
    assert mode(tmp_path / "d") == mode(tmp_path / "plain_dir") == 0o777 & ~umask
    assert (tmp_path / "d" / "f").read_text() == "z"
