"""Cuts, speed perturbation and 80-bin fbank features, computed in parallel and stored with lilcom.

One call turns a part's recordings + supervisions into ``{prefix}_cuts_{part}.jsonl.gz`` whose
cuts carry features in ``{prefix}_feats_{part}/``. A cut whose audio cannot be decoded is named,
counted and skipped. All outputs (feature directory, cut manifest, summary) are built under
temporary names and renamed into place together only when everything succeeded, the summary
last: a stage killed at any point before that leaves none of them under its final name.

Without features (``FbankOptions.features`` False, ``zipasr fbank --no-features``) the cuts
carry their audio only, speed-perturbed copies included (lhotse perturbs the audio when it is
read), and the feature directory stays empty: training computes the features in its loader
with :func:`fbank_extractor` (``zipasr train --on-the-fly-features``; docs/data.md).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import multiprocessing as mp
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from zipasr.data.checks import check_manifests, report_problems
from zipasr.errors import ZipasrError
from zipasr.io import atomic_dir, atomic_path

log = logging.getLogger(__name__)


@dataclass
class FbankOptions:
    num_mel_bins: int = 80
    frame_shift: float = 0.01
    dither: float = 0.0
    speed_perturb: list[float] = field(default_factory=list)  # e.g. [0.9, 1.1]; 1.0 always kept
    num_jobs: int = 1
    shards_per_job: int = 4  # more shards than workers: a smooth progress bar, balanced load
    strict: bool = False
    features: bool = True  # False: cuts with audio only, for features computed on the fly


EXTRACTOR_OPTIONS = ("num_mel_bins", "frame_shift", "dither")


def extractor_options(options: dict[str, Any]) -> dict[str, Any]:
    """The extractor's options (:data:`EXTRACTOR_OPTIONS`) with defaults filled in; an unknown
    key is an error."""
    unknown = sorted(set(options) - set(EXTRACTOR_OPTIONS))
    if unknown:
        raise ZipasrError(f"unknown feature option(s): {', '.join(unknown)} (known: "
                          f"{', '.join(EXTRACTOR_OPTIONS)})")
    defaults = FbankOptions()
    return {k: options.get(k, getattr(defaults, k)) for k in EXTRACTOR_OPTIONS}


def fbank_extractor(num_mel_bins: int = FbankOptions.num_mel_bins,
                    frame_shift: float = FbankOptions.frame_shift,
                    dither: float = FbankOptions.dither) -> Any:
    """lhotse's ``Fbank`` with these options: the one place the features' extractor is built
    (the data stage, on-the-fly decoding and ``zipasr transcribe`` all take it from here)."""
    from lhotse import Fbank, FbankConfig

    return Fbank(FbankConfig(num_mel_bins=num_mel_bins, frame_shift=frame_shift, dither=dither))


def make_cuts(recordings_path: Path, supervisions_path: Path, *, speed_perturb: list[float],
              what: str, strict: bool):
    """Load and check a part's manifests; return its cuts, speed-perturbed copies appended."""
    from lhotse import CutSet, RecordingSet, SupervisionSet

    recs = RecordingSet.from_file(recordings_path)
    sups = SupervisionSet.from_file(supervisions_path)
    recs, sups, problems = check_manifests(recs, sups)
    report_problems(problems, what, strict)
    if len(recs) == 0:
        raise ZipasrError(f"{what}: no usable recording in {recordings_path}")
    cuts = CutSet.from_manifests(recordings=recs, supervisions=sups)
    # One utterance per recording (LibriSpeech, synth): name the cut after its utterance, so
    # recogs/errs files and logs show the corpus's own ids.
    cuts = CutSet.from_cuts(
        c.with_id(c.supervisions[0].id) if len(c.supervisions) == 1 else c for c in cuts
    )
    # Perturbed copies get ids with an "_sp{factor}" suffix (lhotse), so all three coexist.
    perturbed = [cuts.perturb_speed(f) for f in speed_perturb if not math.isclose(f, 1.0)]
    for p in perturbed:
        cuts = cuts + p
    return cuts.to_eager()


def _extract_shard(cut_dicts: list[dict], storage_file: str, opts: dict) -> tuple[list, list]:
    """Worker: compute and store features for one shard; return (cut dicts, problems)."""
    import torch
    from lhotse.features.io import LilcomChunkyWriter
    from lhotse.serialization import deserialize_item

    torch.set_num_threads(1)  # one worker per core; intra-op threads would oversubscribe
    extractor = fbank_extractor(**opts)
    done, problems = [], []
    with LilcomChunkyWriter(storage_file) as writer:
        for d in cut_dicts:
            cut = deserialize_item(d)
            try:
                cut = cut.compute_and_store_features(extractor, writer)
            except Exception as e:
                src = ", ".join(s.source for s in cut.recording.sources)
                reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
                problems.append(f"cut {cut.id}: cannot decode audio {src}: {reason}")
                continue
            done.append(cut.to_dict())
    return done, problems


def compute_fbank(recordings: Path, supervisions: Path, out_cuts: Path, storage_dir: Path,
                  opts: FbankOptions, *, what: str = "fbank", progress: bool = True,
                  summary_path: Path | None = None) -> dict:
    """Compute features for one part; returns a small summary dict (counts, hours, RTF), also
    written as JSON to ``summary_path`` if given (committed with the other outputs)."""
    from lhotse import CutSet
    from lhotse.qa import validate
    from tqdm import tqdm

    t0 = time.perf_counter()
    cuts = make_cuts(recordings, supervisions, speed_perturb=opts.speed_perturb, what=what,
                     strict=opts.strict)
    if not opts.features:
        return _write_cuts_only(cuts, out_cuts, storage_dir, opts, what=what, t0=t0,
                                summary_path=summary_path)
    storage_dir = Path(storage_dir)
    n_shards = max(1, min(len(cuts), opts.num_jobs * opts.shards_per_job))
    shards = [list(s) for s in cuts.split(n_shards)] if n_shards > 1 else [list(cuts)]
    worker_opts = {"num_mel_bins": opts.num_mel_bins, "frame_shift": opts.frame_shift,
                   "dither": opts.dither}
    done: list[dict] = []
    problems: list[str] = []
    with contextlib.ExitStack() as commit:
        # Exits run last-entered first: the features are renamed into place, then the cuts,
        # then the summary, all after the last byte of each is written.
        tmp_summary = commit.enter_context(atomic_path(summary_path)) if summary_path else None
        tmp_cuts = commit.enter_context(atomic_path(out_cuts))
        tmp_dir = commit.enter_context(atomic_dir(storage_dir))
        bar = tqdm(total=len(cuts), desc=what, unit="cut", disable=not progress)
        jobs = [([c.to_dict() for c in shard], str(tmp_dir / f"feats-{i}.lca"), worker_opts)
                for i, shard in enumerate(shards)]
        audio_seconds = sum(c.duration for c in cuts)
        # Worker start-up (spawn + imports) costs seconds: not worth it for a few minutes of audio.
        if opts.num_jobs <= 1 or audio_seconds < 600:
            for job in jobs:
                d, p = _extract_shard(*job)
                done += d
                problems += p
                bar.update(len(job[0]))
        else:
            # spawn: forking a process that already holds torch's thread pools can deadlock.
            ctx = mp.get_context("spawn")
            with ProcessPoolExecutor(max_workers=opts.num_jobs, mp_context=ctx) as ex:
                futures = {ex.submit(_extract_shard, *job): len(job[0]) for job in jobs}
                for fut in as_completed(futures):
                    d, p = fut.result()
                    done += d
                    problems += p
                    bar.update(futures[fut])
        bar.close()
        report_problems(problems, what, opts.strict)
        if not done:
            raise ZipasrError(f"{what}: features could not be computed for any cut")
        # The features will live in storage_dir: point the cuts there (keeping relative paths
        # relative, so the data directory can move with the project, e.g. through DVC).
        order = {c.id: i for i, c in enumerate(cuts)}  # shards finish in any order: keep input's
        done.sort(key=lambda d: order[d["id"]])
        out = CutSet.from_dicts(_relocate(d, tmp_dir, storage_dir) for d in done)
        validate(out, read_data=False)
        out.to_file(tmp_cuts)
        elapsed = time.perf_counter() - t0
        hours = sum(c.duration for c in out) / 3600
        summary = {"cuts": len(out), "skipped": len(problems), "hours": round(hours, 4),
                   "seconds": round(elapsed, 2),
                   "rtf": round(elapsed / max(hours * 3600, 1e-9), 5), "num_jobs": opts.num_jobs}
        if tmp_summary is not None:
            tmp_summary.write_text(json.dumps(summary, indent=2) + "\n")
    log.info("%s: %d cuts, %.3f h of audio in %.1f s (%.0fx real time with %d job(s))",
             what, len(out), hours, elapsed, hours * 3600 / max(elapsed, 1e-9), opts.num_jobs)
    return summary


def _write_cuts_only(cuts, out_cuts: Path, storage_dir: Path, opts: FbankOptions, *,
                     what: str, t0: float, summary_path: Path | None) -> dict:
    """The cuts without features, committed as :func:`compute_fbank` commits its outputs (an
    empty feature directory, so the part's outputs are the same files either way)."""
    from lhotse.qa import validate

    with contextlib.ExitStack() as commit:
        tmp_summary = commit.enter_context(atomic_path(summary_path)) if summary_path else None
        tmp_cuts = commit.enter_context(atomic_path(out_cuts))
        commit.enter_context(atomic_dir(Path(storage_dir)))
        validate(cuts, read_data=False)
        cuts.to_file(tmp_cuts)
        elapsed = time.perf_counter() - t0
        hours = sum(c.duration for c in cuts) / 3600
        summary = {"cuts": len(cuts), "skipped": 0, "hours": round(hours, 4),
                   "seconds": round(elapsed, 2),
                   "rtf": round(elapsed / max(hours * 3600, 1e-9), 5), "num_jobs": opts.num_jobs,
                   "features": "on the fly"}
        if tmp_summary is not None:
            tmp_summary.write_text(json.dumps(summary, indent=2) + "\n")
    log.info("%s: %d cuts, %.3f h of audio, no features (computed on the fly in training)",
             what, len(cuts), hours)
    return summary


def _relocate(d: dict, old_dir: Path, new_dir: Path) -> dict:
    feats = d["features"]
    name = Path(feats["storage_path"]).name
    assert Path(feats["storage_path"]).parent == old_dir, feats["storage_path"]
    feats["storage_path"] = str(new_dir / name)
    return d
