"""MUSAN noise for training (icefall's ``--enable-musan``): download, manifests, features.

The steps are icefall's (egs/librispeech/ASR: ``prepare.sh`` stages 0, 2 and 4, and
``local/compute_fbank_musan.py``):

* download: lhotse's ``download_musan`` from ``{base_url}/17/musan.tar.gz`` (openslr's resource
  17, or any mirror holding it), extracted to ``{target_dir}/musan``; lhotse touches
  ``{target_dir}/.musan_completed`` only after extracting, so a killed or failed download
  leaves no marker, and the next run resumes the partial archive (HTTP Range);
* manifests: lhotse's ``prepare_musan`` for the parts ``music``, ``speech`` and ``noise``,
  written as ``musan_recordings_{part}.jsonl.gz`` (recordings sorted by id: lhotse lists the
  files in file-system order);
* features: the recordings of the three parts, in that order, as cuts, cut into windows of
  10 s, those longer than 5 s kept (a recording's last, shorter window goes unless it is), and
  80-bin fbank of each window with the training features' extractor.

The noise cut manifest ``musan_cuts.jsonl.gz`` is what training's ``noise_cuts`` takes (lhotse
``CutMix``: each training cut mixed with a window at an SNR in ``noise_snr`` with probability
``noise_prob``).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import multiprocessing as mp
import tarfile
import time
import zlib
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from zipasr.errors import ZipasrError
from zipasr.io import atomic_dir, atomic_path

log = logging.getLogger(__name__)

PARTS = ("music", "speech", "noise")  # icefall's compute_fbank_musan.py
WINDOW = 10.0  # seconds per noise cut
MIN_DURATION = 5.0  # windows of this length or shorter are dropped (icefall's is_cut_long)
RESOURCE = 17  # openslr's resource number of MUSAN


def download_musan(target_dir: Path, base_url: str, keep_archive: bool = False) -> Path:
    """Download and extract MUSAN into ``target_dir/musan``; returns that directory.

    Nothing is fetched when ``target_dir/.musan_completed`` exists (lhotse's rule). A download
    that fails leaves its partial archive, which the next call resumes; an archive that cannot
    be extracted (corrupt, or not MUSAN's) is removed, so the next call fetches it anew.
    """
    from lhotse.recipes.musan import download_musan as lhotse_download

    target_dir = Path(target_dir)
    target_dir.mkdir(parents=True, exist_ok=True)
    url = f"{base_url.rstrip('/')}/{RESOURCE}/musan.tar.gz"
    archive = target_dir / "musan.tar.gz"
    try:
        lhotse_download(target_dir, url=url)
    except (tarfile.TarError, EOFError, zlib.error) as e:
        archive.unlink(missing_ok=True)
        raise ZipasrError(f"{archive} (from {url}) cannot be extracted, removed: {e}") from e
    except Exception as e:  # network errors come in many types; name the URL either way
        raise ZipasrError(f"downloading MUSAN from {url} failed: {e}") from e
    corpus_dir = target_dir / "musan"
    if not (target_dir / ".musan_completed").is_file():
        raise ZipasrError(f"MUSAN: download finished but {target_dir}/.musan_completed is "
                          "missing")
    missing = [p for p in PARTS if not (corpus_dir / p).is_dir()]
    if missing:
        raise ZipasrError(f"{url} is not MUSAN: {corpus_dir} has no {', '.join(missing)}")
    if archive.exists() and not keep_archive:
        archive.unlink()  # the extracted copy is what the DAG uses; don't keep 11 GB twice
    return corpus_dir


def manifest_paths(manifest_dir: Path) -> dict[str, Path]:
    return {part: Path(manifest_dir) / f"musan_recordings_{part}.jsonl.gz" for part in PARTS}


def prepare_musan(corpus_dir: Path, manifest_dir: Path) -> dict[str, Path]:
    """Write ``musan_recordings_{music,speech,noise}.jsonl.gz`` (lhotse's ``prepare_musan``)."""
    from lhotse import RecordingSet
    from lhotse.recipes.musan import prepare_musan as lhotse_prepare

    corpus_dir = Path(corpus_dir)
    if not corpus_dir.is_dir():
        raise ZipasrError(f"{corpus_dir} does not exist: was MUSAN downloaded?")
    manifests = lhotse_prepare(corpus_dir, parts=PARTS)
    out = manifest_paths(manifest_dir)
    for part in PARTS:
        recs = manifests[part]["recordings"]
        if len(recs) == 0:
            raise ZipasrError(f"MUSAN {part}: no .wav file under {corpus_dir / part}")
        recs = RecordingSet.from_recordings(sorted(recs, key=lambda r: r.id))
        with atomic_path(out[part]) as tmp:
            recs.to_file(tmp)
        log.info("MUSAN %s: %d recordings, %.3f h", part, len(recs),
                 sum(r.duration for r in recs) / 3600)
    return out


def noise_windows(recordings: list[Path], window: float = WINDOW,
                  min_duration: float = MIN_DURATION):
    """icefall's noise cuts, before features: the recordings as cuts, in windows of ``window``
    seconds, those longer than ``min_duration`` kept."""
    from lhotse import CutSet, RecordingSet, combine

    recs = combine(RecordingSet.from_file(p) for p in recordings)
    return (CutSet.from_manifests(recordings=recs).cut_into_windows(window)
            .filter(functools.partial(_longer_than, min_duration)).to_eager())


def _longer_than(seconds: float, cut) -> bool:
    return cut.duration > seconds


def _extract(cut_dicts: list[dict], storage_file: str, opts: dict) -> list[dict]:
    """Worker: compute and store the features of some windows; returns their cut dicts."""
    import torch
    from lhotse.features.io import LilcomChunkyWriter
    from lhotse.serialization import deserialize_item

    from zipasr.data.fbank import fbank_extractor

    torch.set_num_threads(1)  # one worker per core
    extractor = fbank_extractor(**opts)
    with LilcomChunkyWriter(storage_file) as writer:
        return [deserialize_item(d).compute_and_store_features(extractor, writer).to_dict()
                for d in cut_dicts]


def compute_musan_fbank(recordings: list[Path], out_cuts: Path, storage_dir: Path, *,
                        num_mel_bins: int = 80, frame_shift: float = 0.01, dither: float = 0.0,
                        num_jobs: int = 1, window: float = WINDOW,
                        min_duration: float = MIN_DURATION,
                        summary_path: Path | None = None) -> dict:
    """The noise cut set with features (module docstring). Features, cuts and summary are
    renamed into place together when complete, the summary last (as ``zipasr fbank``)."""
    from lhotse import CutSet

    t0 = time.perf_counter()
    cuts = noise_windows(recordings, window, min_duration)
    if len(cuts) == 0:
        raise ZipasrError(f"MUSAN: no window longer than {min_duration} s in {recordings}")
    storage_dir = Path(storage_dir)
    opts = {"num_mel_bins": num_mel_bins, "frame_shift": frame_shift, "dither": dither}
    n_shards = max(1, min(len(cuts), num_jobs * 4))
    size = math.ceil(len(cuts) / n_shards)
    dicts = [c.to_dict() for c in cuts]
    with contextlib.ExitStack() as commit:
        tmp_summary = commit.enter_context(atomic_path(summary_path)) if summary_path else None
        tmp_cuts = commit.enter_context(atomic_path(out_cuts))
        tmp_dir = commit.enter_context(atomic_dir(storage_dir))
        jobs = [(dicts[i:i + size], str(tmp_dir / f"feats-{k}.lca"), opts)
                for k, i in enumerate(range(0, len(dicts), size))]
        # worker start-up (spawn + imports) costs seconds: not worth it for a few minutes
        if num_jobs <= 1 or len(jobs) == 1 or sum(c.duration for c in cuts) < 600:
            done = [_extract(*job) for job in jobs]
        else:  # spawn: forking a process that holds torch's thread pools can deadlock
            with ProcessPoolExecutor(max_workers=num_jobs,
                                     mp_context=mp.get_context("spawn")) as ex:
                done = list(ex.map(_extract, *zip(*jobs, strict=True)))
        out = []
        for shard in done:  # in input order; features pointed at their final directory
            for d in shard:
                name = Path(d["features"]["storage_path"]).name
                d["features"]["storage_path"] = str(storage_dir / name)
                out.append(d)
        out = CutSet.from_dicts(out)
        out.to_file(tmp_cuts)
        seconds = sum(c.duration for c in out)
        elapsed = time.perf_counter() - t0
        summary = {"cuts": len(out), "hours": round(seconds / 3600, 4),
                   "max_duration": round(max(c.duration for c in out), 4),
                   "min_duration": round(min(c.duration for c in out), 4),
                   "seconds": round(elapsed, 2), "rtf": round(elapsed / seconds, 5),
                   "num_jobs": num_jobs}
        if tmp_summary is not None:
            tmp_summary.write_text(json.dumps(summary, indent=2) + "\n")
    log.info("MUSAN: %d noise cuts of %g-%g s, %.3f h, features in %.1f s", len(out),
             summary["min_duration"], summary["max_duration"], seconds / 3600, elapsed)
    return summary
