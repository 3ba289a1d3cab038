"""Sharded fbank: one part's features as N jobs instead of one (``features.num_splits``).

``split_manifests`` cuts a part's recordings into N contiguous pieces, in manifest order, each
with the supervisions of its recordings; every piece then goes through ``zipasr fbank`` as a job
of its own (on a cluster, a Slurm job each); ``gather_cuts`` joins the pieces' cut manifests into
the part's ``{prefix}_cuts_{part}.jsonl.gz`` and sums their summaries.

The gathered manifest holds the cuts of an unsplit run in the same order: ``zipasr fbank`` writes
a part's original cuts, then each speed-perturbed copy of them; the pieces do the same for their
recordings, so the gather takes, for each perturbation in turn (the original first), that
perturbation's cuts of piece 0, 1, ... N-1. The part's outputs are those of an unsplit run: its
cuts, its ``{prefix}_feats_{part}/`` (the pieces' feature files, hard-linked: no second copy)
and its summary. So the pieces are never read after the gather, and the DAG sees the same files
whichever N made them (Snakemake compares a rule's recorded inputs, parameters and code only
when all of its outputs are there).
"""

from __future__ import annotations

import contextlib
import gzip
import json
import logging
import os
import shutil
from array import array
from pathlib import Path

from zipasr.errors import ZipasrError
from zipasr.io import atomic_dir, atomic_path

log = logging.getLogger(__name__)


def piece_paths(out_dir: Path, prefix: str, part: str, i: int) -> dict[str, Path]:
    """Piece ``i``'s manifests: ``{out_dir}/{prefix}_{recordings,supervisions}_{part}.{i}.jsonl.gz``."""
    return {kind: Path(out_dir) / f"{prefix}_{kind}_{part}.{i}.jsonl.gz"
            for kind in ("recordings", "supervisions")}


def split_manifests(recordings: Path, supervisions: Path, num_splits: int, out_dir: Path, *,
                    prefix: str, part: str) -> list[dict[str, Path]]:
    """Write ``num_splits`` pieces of a part's manifests (lhotse's ``split``: contiguous, in
    order, sizes differing by one at most); each piece has the supervisions of its recordings.
    Returns the pieces' paths."""
    from lhotse import RecordingSet, SupervisionSet

    recs = RecordingSet.from_file(recordings).to_eager()
    sups = SupervisionSet.from_file(supervisions).to_eager()
    if num_splits < 1:
        raise ZipasrError(f"--num-splits must be at least 1, not {num_splits}")
    if num_splits > len(recs):
        raise ZipasrError(f"{prefix} {part}: features.num_splits {num_splits} is more than its "
                          f"{len(recs)} recording(s)")
    by_rec: dict[str, list] = {}
    for s in sups:
        by_rec.setdefault(s.recording_id, []).append(s)
    orphans = len(sups) - sum(len(by_rec.get(r.id, [])) for r in recs)
    if orphans:
        log.warning("%s %s: %d supervision(s) of no recording in %s left out", prefix, part,
                    orphans, recordings)
    out = []
    for i, piece in enumerate(recs.split(num_splits)):
        paths = piece_paths(out_dir, prefix, part, i)
        piece_sups = SupervisionSet.from_segments(s for r in piece for s in by_rec.get(r.id, []))
        for key, manifest in (("supervisions", piece_sups), ("recordings", piece)):
            with atomic_path(paths[key]) as tmp:
                manifest.to_file(tmp)
        log.info("%s %s piece %d: %d recordings, %d supervisions, %.3f h", prefix, part, i,
                 len(piece), len(piece_sups), sum(r.duration for r in piece) / 3600)
        out.append(paths)
    return out


def _perturbation(cut: dict) -> str:
    """What a cut's audio went through (lhotse's recording transforms, e.g. Speed 0.9): the
    key of the group ``zipasr fbank`` wrote it in. The original's is ``[]``."""
    return json.dumps((cut.get("recording") or {}).get("transforms") or [], sort_keys=True)


def _lines(path: Path):
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield line


def _link(src: Path, dst: Path) -> None:
    """``dst`` as a hard link of ``src`` (no second copy of the features), or a copy where the
    file system has no hard links."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def gather_cuts(cut_paths: list[Path], out_cuts: Path, storage_dir: Path, *,
                summary_paths: list[Path] = (), summary_path: Path | None = None) -> dict:
    """Join the pieces' cut manifests (given in piece order) into ``out_cuts`` in an unsplit
    run's order (module docstring). Their feature files are linked into ``storage_dir`` as
    ``piece{i}-{name}`` and the cuts pointed there, so the part has the layout of an unsplit
    run. The pieces' summaries are summed into ``summary_path``. Features, cuts and summary are
    renamed into place together when complete, the summary last (as ``zipasr fbank``).

    Two passes over the pieces' lines, the groups and then the copy: memory holds the ids and
    one byte per cut, not the cuts."""
    cut_paths = [Path(p) for p in cut_paths]
    storage_dir = Path(storage_dir)
    groups: dict[str, int] = {}  # perturbation -> rank, in order of first appearance
    index: list[array] = []  # per piece, each line's group rank
    ids: set[str] = set()
    seconds = 0.0
    for path in cut_paths:
        ranks = array("B")
        for line in _lines(path):
            cut = json.loads(line)
            if cut["id"] in ids:
                raise ZipasrError(f"cut {cut['id']} of {path} is in an earlier piece as well")
            ids.add(cut["id"])
            seconds += cut["duration"]
            rank = groups.setdefault(_perturbation(cut), len(groups))
            if rank > 255:
                raise ZipasrError(f"{path}: more kinds of perturbed cuts than gather-cuts "
                                  "handles (256)")
            ranks.append(rank)
        if not ranks:
            raise ZipasrError(f"{path}: no cut")
        index.append(ranks)

    pieces = [json.loads(Path(p).read_text()) for p in summary_paths]
    with contextlib.ExitStack() as commit:
        tmp_summary = commit.enter_context(atomic_path(summary_path)) if summary_path else None
        tmp_cuts = commit.enter_context(atomic_path(out_cuts))
        tmp_dir = commit.enter_context(atomic_dir(storage_dir))
        linked: dict[tuple[int, str], str] = {}  # (piece, its storage path) -> the part's
        with gzip.open(tmp_cuts, "wt", encoding="utf-8", compresslevel=6) as out:
            for rank in range(len(groups)):
                for i, (path, ranks) in enumerate(zip(cut_paths, index, strict=True)):
                    for line, r in zip(_lines(path), ranks, strict=True):
                        if r != rank:
                            continue
                        cut = json.loads(line)
                        feats = cut.get("features")
                        if feats is not None:  # (cuts computed on the fly have none)
                            src = feats["storage_path"]
                            if (i, src) not in linked:
                                name = f"piece{i}-{Path(src).name}"
                                _link(Path(src), tmp_dir / name)
                                linked[(i, src)] = str(storage_dir / name)
                            feats["storage_path"] = linked[(i, src)]
                        out.write(json.dumps(cut, ensure_ascii=False) + "\n")
        hours = seconds / 3600
        elapsed = sum(p.get("seconds", 0.0) for p in pieces)  # job time, summed over pieces
        summary = {"cuts": len(ids), "skipped": sum(p.get("skipped", 0) for p in pieces),
                   "hours": round(hours, 4), "seconds": round(elapsed, 2),
                   "rtf": round(elapsed / max(seconds, 1e-9), 5),
                   "num_jobs": max((p.get("num_jobs", 1) for p in pieces), default=1),
                   "num_splits": len(cut_paths)}
        if tmp_summary is not None:
            tmp_summary.write_text(json.dumps(summary, indent=2) + "\n")
    log.info("gathered %d pieces into %s: %d cuts, %.3f h", len(cut_paths), out_cuts, len(ids),
             hours)
    return summary
