"""The repository stands alone: no tracked file points at material outside it (a design or
spec folder beside a developer's checkout is not in a user's clone)."""

from __future__ import annotations

import re
import subprocess

from helpers import ROOT

# the paths, and "spec 5.4"-style citations of the reference specs' sections
# (DESIGN.md in capitals: the outside design document; docs/design.md is the repository's own)
OUTSIDE = re.compile(r"\.\./shared|shared/(specs|notes)|(?-i:DESIGN\.md)"
                     r"|\bspec(s)? ?(§|section )?\d", re.IGNORECASE)


def test_no_file_points_outside_the_repository() -> None:
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                           check=True).stdout.split()
    assert len(files) > 50
    hits = []
    for name in files:
        path = ROOT / name
        if name == "tests/test_standalone.py" or not path.is_file():
            continue
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            continue
        hits += [f"{name}:{i}: {line.strip()}" for i, line in enumerate(text.splitlines(), 1)
                 if OUTSIDE.search(line)]
    assert not hits, "\n".join(hits)
