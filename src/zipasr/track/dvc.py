"""DVC around the Snakemake DAG: record and push its outputs after a run; restore them on a
fresh clone so that Snakemake has nothing to redo. dvc.yaml (top level) lists the outputs."""

from __future__ import annotations

import logging
import shlex
import subprocess
import sys
from pathlib import Path

log = logging.getLogger("zipasr.track")


def _bin(name: str) -> str:
    return str(Path(sys.executable).parent / name)


def _run(cmd: list[str], cwd: Path) -> int:
    log.info("$ %s", " ".join(cmd))
    return subprocess.run(cmd, cwd=cwd).returncode


def is_dvc_repo(root: Path) -> bool:
    return (root / ".dvc").is_dir() and (root / "dvc.yaml").is_file()


def commit_and_push(root: Path, push: bool = True) -> int:
    """``dvc commit --force`` (hash the outputs the workflow just made into dvc.lock and the
    cache; nothing reruns: Snakemake made them) then ``dvc push`` to the default remote.

    Nonzero only when the commit fails. A failed push (remote gone, unwritable, offline) is a
    warning: the data version is recorded locally and the push can be done later, as the
    warning says."""
    if not is_dvc_repo(root):
        log.info("%s is not a DVC repository (no .dvc/ or dvc.yaml): nothing to version", root)
        return 0
    rc = _run([_bin("dvc"), "commit", "--force", "--quiet"], root)
    if rc != 0:
        return rc
    pushed = push and _push(root)
    log.info("outputs versioned in dvc.lock%s; commit dvc.lock to git to record them",
             " and pushed" if pushed else "")
    return 0


def default_remote(root: Path) -> tuple[str, str] | None:
    """(name, URL as DVC resolves it) of the default remote, or None. (Not ``dvc remote
    list``: it wraps long URLs over several lines.)"""
    def dvc_out(*args: str) -> str:
        proc = subprocess.run([_bin("dvc"), *args], cwd=root, capture_output=True, text=True)
        return proc.stdout.strip() if proc.returncode == 0 else ""

    name = dvc_out("remote", "default")
    return (name, dvc_out("config", f"remote.{name}.url")) if name else None


def _push(root: Path) -> bool:
    """``dvc push``; on failure, one warning naming the remote, DVC's error and the command
    that pushes later."""
    cmd = [_bin("dvc"), "push"]  # not --quiet: that would hide DVC's error message too
    log.info("$ %s", " ".join(cmd))
    proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True)
    sys.stderr.write(proc.stdout + proc.stderr)  # DVC's own report stays in the log
    if proc.returncode == 0:
        return True
    errors = [ln.strip() for ln in (proc.stdout + proc.stderr).splitlines()
              if ln.startswith("ERROR")]
    remote = default_remote(root)
    later = [_bin("dvc"), "push"] + (["-r", remote[0]] if remote else [])
    log.warning(
        "dvc push to the default remote %s failed (%s). Nothing is lost: the outputs are "
        "versioned locally (dvc.lock and the DVC cache .dvc/cache); once the remote is "
        "reachable, push them with `%s` in %s (or rerun `zipasr dvc-commit` there)",
        f"'{remote[0]}' ({remote[1]})" if remote else
        "(none configured: add one with `dvc remote add -d NAME URL`)",
        "; ".join(errors) or f"exit code {proc.returncode}", shlex.join(later), root)
    return False


def restore(root: Path, pull: bool = True, snakemake_args: list[str] | None = None) -> int:
    """``dvc pull``, then ``snakemake --touch``.

    DVC checks files out with the time of the checkout, in no particular order, so a restored
    BPE model can look older than the manifests it was trained on and Snakemake would rerun it.
    ``--touch`` walks the DAG in order and touches outputs whose inputs look newer, without
    running anything; Snakemake's other rerun triggers (params, code, input set) only compare
    with its own metadata, which a fresh clone does not have, so they fire for nothing.
    """
    if pull:
        rc = _run([_bin("dvc"), "pull"], root)
        if rc != 0:
            return rc
    return _run([_bin("snakemake"), "--cores", "1", "--touch", "--no-hooks", "--quiet", "all",
                 *(snakemake_args or [])], root)
