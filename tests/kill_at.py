"""Run the real ``zipasr`` CLI and SIGKILL it at a chosen moment of writing its outputs.

Used by tests/test_atomic_outputs.py; no production code knows about it. Usage::

    python tests/kill_at.py SPEC [zipasr arguments...]

SPEC is a JSON object with one trigger:

* ``{"write": NAME, "after": N}``: once N bytes (characters in text mode) have been written to
  a file opened for writing whose base name contains NAME, flush that much and SIGKILL: the
  file is left half-written, under whatever name the stage chose (temporary or final).
* ``{"replace": NAME}``: SIGKILL just before ``os.replace``/``os.rename`` onto a path whose
  base name is NAME (the moment a temporary would become the final output).

``"torch_save": true`` makes ``torch.save`` of a path write through ``open()``, so that a
``write`` trigger sees its bytes (torch's own C++ writer opens paths itself).
"""

from __future__ import annotations

import builtins
import functools
import io
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


class _KillingFile:
    """A file object that SIGKILLs the process once ``limit`` bytes went through ``write``."""

    def __init__(self, f: Any, limit: int) -> None:
        self._f = f
        self._left = limit

    def write(self, data: Any) -> int:
        if len(data) >= self._left:  # this write crosses the limit: only its head lands
            self._f.write(data[: self._left])
            self._f.flush()
            _die()
        self._left -= len(data)
        return self._f.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)

    def __iter__(self) -> Any:
        return iter(self._f)

    def __enter__(self) -> _KillingFile:
        self._f.__enter__()
        return self

    def __exit__(self, *exc: Any) -> Any:
        return self._f.__exit__(*exc)


def _install(spec: dict[str, Any]) -> None:
    if "write" in spec:
        name, limit, real_open = spec["write"], int(spec["after"]), io.open

        @functools.wraps(real_open)
        def killing_open(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
            f = real_open(file, mode, *args, **kwargs)
            writing = any(c in mode for c in "wax+")
            if writing and isinstance(file, (str, os.PathLike)) and name in Path(file).name:
                return _KillingFile(f, limit)
            return f

        # builtins.open: lhotse, gzip, plain open(); io.open: pathlib's write_text/open
        builtins.open = io.open = killing_open

    if "replace" in spec:
        target = spec["replace"]
        for fn in ("replace", "rename"):
            real = getattr(os, fn)

            def killing_rename(src: Any, dst: Any, *args: Any, _real: Any = real,
                               **kwargs: Any) -> None:
                if Path(dst).name == target:
                    _die()
                _real(src, dst, *args, **kwargs)

            setattr(os, fn, killing_rename)

    if spec.get("torch_save"):
        import torch

        real_save = torch.save

        def save_through_open(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
            if isinstance(f, (str, os.PathLike)):
                with open(f, "wb") as fh:
                    return real_save(obj, fh, *args, **kwargs)
            return real_save(obj, f, *args, **kwargs)

        torch.save = save_through_open


def main() -> int:
    _install(json.loads(sys.argv[1]))
    from zipasr.cli import main as zipasr_main

    return zipasr_main(sys.argv[2:])


if __name__ == "__main__":
    sys.exit(main())
