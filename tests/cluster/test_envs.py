"""envs/*.yaml (the cluster's conda environments) agree with pyproject.toml: the same runtime
packages, pins that pyproject allows, a Python it supports, and the project itself from this
checkout. A dependency added to pyproject without the envs (or the reverse) fails here."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from helpers import ROOT
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

tomllib = pytest.importorskip("tomllib")

ENVS = sorted((ROOT / "envs").glob("*.yaml"))
# Packages an env may carry beyond pyproject's (documented optional extras only).
OPTIONAL = {"k2"}


def _pyproject() -> tuple[dict[str, Requirement], SpecifierSet]:
    """The runtime requirements: the dependencies and the `deploy` extra (the DAG's export rule
    runs onnx and onnxruntime)."""
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    runtime = data["dependencies"] + data["optional-dependencies"]["deploy"]
    reqs = {canonicalize_name(r.name): r for r in map(Requirement, runtime)}
    return reqs, SpecifierSet(data["requires-python"])


def _env(path: Path) -> tuple[dict[str, Requirement], list[str], list[str]]:
    """(pip requirements by name, pip options and local paths, conda dependencies)."""
    doc = yaml.safe_load(path.read_text())
    conda, pip = [], []
    for dep in doc["dependencies"]:
        if isinstance(dep, dict):
            pip += dep["pip"]
        else:
            conda.append(dep)
    reqs, other = {}, []
    for line in pip:
        if line.startswith("-") or line.startswith("."):
            other.append(line)
        else:
            r = Requirement(line)
            reqs[canonicalize_name(r.name)] = r
    return reqs, other, conda


def test_there_are_cuda_and_cpu_envs() -> None:
    assert {p.name for p in ENVS} >= {"zipasr-cuda.yaml", "zipasr-cpu.yaml"}


@pytest.mark.parametrize("path", ENVS, ids=lambda p: p.name)
def test_env_matches_pyproject(path: Path) -> None:
    deps, requires_python = _pyproject()
    reqs, other, conda = _env(path)

    missing = sorted(set(deps) - set(reqs))
    assert not missing, f"{path.name} lacks pyproject dependencies {missing}"
    extra = sorted(set(reqs) - set(deps) - OPTIONAL)
    assert not extra, f"{path.name} has packages pyproject does not declare: {extra}"

    for name, r in reqs.items():
        want = deps[name].specifier
        pins = [s.version for s in r.specifier if s.operator == "=="]
        if pins:
            # an exact pin must be a version pyproject allows
            assert all(want.contains(v, prereleases=True) for v in pins), (path.name, r, want)
        else:
            # a range must be pyproject's range, so the two cannot drift apart silently
            assert r.specifier == want, (path.name, r, want)

    # a Python pyproject supports
    (python,) = [d for d in conda if d.split("=")[0].strip() == "python"]
    assert requires_python.contains(python.split("=")[-1] + ".0"), python
    assert "pip" in conda

    # the project itself, editable, from this checkout (paths are relative to the env file)
    local = [o.split()[-1] for o in other if o.startswith("-e ")]
    assert len(local) == 1 and (path.parent / local[0]).resolve() == ROOT, other


def test_cuda_env_takes_a_cuda_torch() -> None:
    _, other, _ = _env(ROOT / "envs" / "zipasr-cuda.yaml")
    index = [o for o in other if "index-url" in o]
    assert index and all("/whl/cu" in o for o in index), index
