"""The training data path at LibriSpeech 960 h scale: cut manifests read eagerly vs lazily.

Generates (once per directory) manifests of LibriSpeech 960 h's size with speed perturbation,
as the DAG writes them: one gzipped JSONL cut manifest per train part (train-clean-100,
train-clean-360, train-other-500: 28,539 + 104,014 + 148,688 utterances, each followed in its
file by its 0.9 and 1.1 speed-perturbed copies, 843,723 cuts in all), and a dev manifest of
5,567 cuts (dev-clean + dev-other). Metadata only: durations drawn from a LibriSpeech-like
distribution (1-35 s, mean ~12.3 s; the copies' durations /0.9 and /1.1), LibriSpeech-like ids,
speakers and audio paths (never read), transcripts of realistic length (~2.7 words per second),
and features pointing into ONE small real lilcom store (``feats.lca``: 8 fbank matrices of 40 s
of synthetic audio, computed with the data stage's extractor): every cut reads the first
``num_frames`` of one of them, as a cut shorter than its features does in lhotse. A 500-piece
BPE model trained on the transcripts serves the trainer's filter.

Then, per variant, ``--world-size`` processes (default 2: a gloo DDP run, each process a rank
with RANK / WORLD_SIZE / MASTER_ADDR set as torchrun sets them) each build the real Trainer
(the xs model, DDP-wrapped; TrainConfig's defaults, icefall's: max_duration 1000, 30 buckets,
buffer 150,000 cuts, cuts of 1-20 s) and its data:

* eager: the trainer before lazy manifests: every cut read into memory (``load_cuts``),
  filtered in memory (``filter_cuts``), counted, then the sampler and loaders over them;
* lazy: ``Trainer._data`` as it is: ``LazyCuts`` streams the manifests through the filter.

and draws the first training batch (features read from the store; ``--num-workers 0`` by
default, so everything happens in the rank's own process and its RSS covers it). The
variants run one after the other, never side by side.

    .venv/bin/python benchmarks/data_scale.py --out-dir /tmp/zipasr-960h

Reading the table: one column per variant and rank. "model ready" is the time from the
rank's process start to its model and process group being ready (imports, the model, DDP: the
same for both variants); "start-up" is from process start to its DataLoader being ready (that,
plus the data setup, where the variants differ); "first batch" is from process start to the
first batch in hand. The "CPU" rows are the process's CPU time (user + system) up to the same
points: on a busy machine (the ranks share the cores with each other and with whatever else
runs) wall time stretches, CPU time is what a core of its own would take. "peak RSS" is the
process's maximum resident memory (getrusage ru_maxrss), "baseline RSS" its resident memory
before the data setup (Python, torch, the model): the difference is what the data costs. The
goal for lazy: first batch within 60 s and under 1 GB of peak RSS per rank. ``--cuts N``
makes a smaller corpus (a quick check of the script); ``--variants lazy`` skips the eager run
(which needs several GB per rank).
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# LibriSpeech's train parts (utterances), its dev sets (dev-clean + dev-other)
PARTS = {"train-clean-100": 28_539, "train-clean-360": 104_014, "train-other-500": 148_688}
DEV_CUTS = 5_567
SPEEDS = (0.9, 1.1)
STORE_SECONDS, STORE_MATRICES = 40.0, 8
SR = 16000


# -- the corpus ----------------------------------------------------------------------------


def draw_durations(n: int, rng) -> list[float]:
    """LibriSpeech-like utterance durations: most 11-17 s (the segmenter's target), a spread of
    shorter ones (chapter and sentence ends), a thin tail to 35 s; mean ~12.3 s."""
    import numpy as np

    kind = rng.random(n)
    d = np.where(kind < 0.68, rng.normal(14.2, 1.7, n),
                 np.where(kind < 0.985, rng.uniform(1.0, 14.0, n), rng.uniform(17.0, 35.0, n)))
    return [round(float(x), 4) for x in np.clip(d, 1.0, 35.0)]


def _words() -> list[str]:
    from importlib.resources import files

    words = []
    for name in ("nouns", "verbs", "adjectives", "adverbs", "names"):
        words += files("zipasr.data.synth").joinpath("text", f"{name}.txt").read_text().split()
    return sorted({w.upper() for w in words if w.isalpha()})


def _text(duration: float, words: list[str], rng) -> str:
    n = max(1, int(round(duration * 2.7 + rng.normal(0, 1.5))))
    return " ".join(words[i] for i in rng.integers(0, len(words), n))


def _feature_store(out: Path) -> list[dict]:
    """STORE_MATRICES real fbank matrices of STORE_SECONDS of synthetic audio in one lilcom
    store; returns their lhotse ``features`` fields (storage key, frames)."""
    import numpy as np
    import torch
    from lhotse.features.io import LilcomChunkyWriter

    from zipasr.data.fbank import fbank_extractor

    torch.set_num_threads(1)
    extractor = fbank_extractor()
    rng = np.random.default_rng(0)
    n = int(STORE_SECONDS * SR)
    store = []
    with LilcomChunkyWriter(out / "feats.lca") as writer:
        for i in range(STORE_MATRICES):
            t = np.arange(n) / SR
            f0 = 90 + 150 * rng.random() + 30 * np.sin(2 * np.pi * 0.5 * t)  # gliding pitch
            x = sum(np.sin(2 * np.pi * np.cumsum(f0) / SR * k) / k for k in range(1, 8))
            x = x * (0.3 + 0.7 * (np.sin(2 * np.pi * 3 * t) > 0)) + 0.02 * rng.normal(size=n)
            feats = extractor.extract((0.3 * x / np.abs(x).max()).astype(np.float32), SR)
            key = writer.write(f"m{i}", feats)
            store.append({"storage_key": key, "num_frames": int(feats.shape[0])})
    return store


def _cut(uid: str, duration: float, text: str, speaker: str, part: str, feats: dict,
         store_path: str, factor: float | None) -> dict:
    """A cut dict as the DAG's fbank writes it (lhotse's layout; perturbed copies carry a
    Speed transform and the ``_sp{factor}`` suffix)."""
    from lhotse.utils import perturb_num_samples

    num_samples = int(round(duration * SR))
    rec_id = uid
    if factor is not None:
        num_samples = perturb_num_samples(num_samples, factor)
        rec_id = f"{uid}_sp{factor}"
    dur = num_samples / SR
    chapter = uid.split("-")[1]
    rec = {"id": rec_id, "sources": [{"type": "file", "channels": [0], "source":
                                      f"data/download/LibriSpeech/{part}/{speaker}/{chapter}/"
                                      f"{uid}.flac"}],
           "sampling_rate": SR, "num_samples": num_samples, "duration": dur,
           "channel_ids": [0]}
    if factor is not None:
        rec["transforms"] = [{"name": "Speed", "kwargs": {"factor": factor}}]
    return {"id": rec_id, "start": 0, "duration": dur, "channel": 0,
            "supervisions": [{"id": rec_id, "recording_id": rec_id, "start": 0, "duration": dur,
                              "channel": 0, "text": text, "language": "English",
                              "speaker": speaker}],
            "features": {"type": "kaldi-fbank", "num_frames": feats["num_frames"],
                         "num_features": 80, "frame_shift": 0.01, "sampling_rate": SR,
                         "start": 0, "duration": STORE_SECONDS, "storage_type": "lilcom_chunky",
                         "storage_path": store_path, "storage_key": feats["storage_key"],
                         "channels": 0},
            "recording": rec, "type": "MonoCut"}


def make_corpus(out: Path, scale: float) -> dict:
    """Writes the manifests, the store and the BPE model into ``out`` (kept: a second run with
    the same ``scale`` reuses them)."""
    import numpy as np
    import orjson

    done = out / "corpus.json"
    if done.is_file() and json.loads(done.read_text()).get("scale") == scale:
        return json.loads(done.read_text())
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    store = _feature_store(out)
    store_path = str((out / "feats.lca").resolve())
    rng = np.random.default_rng(1)
    words = _words()
    info = {"scale": scale, "train": [], "cuts": 0, "hours": 0.0}
    texts = []
    for part, utts in [*PARTS.items(), ("dev", DEV_CUTS)]:
        n = max(1, int(utts * scale))
        durations = draw_durations(n, rng)
        base = []
        for i, d in enumerate(durations):
            speaker, chapter = 100 + i // 120, 1000 + i // 40
            base.append((f"{speaker}-{chapter}-{i % 40:04d}", d, _text(d, words, rng),
                         str(speaker)))
        texts += [b[2] for b in base[:20_000]]
        path = out / f"librispeech_cuts_{part}.jsonl.gz"
        factors = (None, *SPEEDS) if part != "dev" else (None,)
        with gzip.open(path, "wb", compresslevel=6) as f:
            for factor in factors:  # the originals, then each speed's copies, as fbank writes
                for k, (uid, d, text, speaker) in enumerate(base):
                    c = _cut(uid, d, text, speaker, part, store[k % len(store)], store_path,
                             factor)
                    f.write(orjson.dumps(c) + b"\n")
                    if part != "dev":
                        info["cuts"] += 1
                        info["hours"] += c["duration"] / 3600
        if part == "dev":
            info["dev"] = str(path)
        else:
            info["train"].append(str(path))
        if part == "train-clean-100":
            info["mean_duration"] = float(np.mean(durations))
    (out / "text.txt").write_text("\n".join(texts) + "\n")
    from zipasr.lang.bpe import train_bpe

    info["bpe"] = str(train_bpe(out / "text.txt", out / "lang", 500))
    info["seconds"] = round(time.perf_counter() - t0, 1)
    info["bytes"] = sum(Path(p).stat().st_size for p in info["train"])
    done.write_text(json.dumps(info, indent=2))
    return info


# -- one rank ------------------------------------------------------------------------------


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _eager_data(t) -> None:
    """The trainer's data setup before lazy manifests (every cut in memory, then filtered)."""
    from zipasr.train.data import filter_cuts, load_cuts, make_train_loader, make_valid_loader

    cfg = t.cfg
    train = load_cuts(t.train_cuts)
    train, dropped = filter_cuts(train, t.sp, cfg.min_cut_duration, cfg.max_cut_duration)
    t.train_stats = {"cuts": len(train), "hours": sum(c.duration for c in train) / 3600,
                     "dropped": dropped, "batches": None}  # counted up front, as it was
    t.train_loader, t.sampler, t.train_dataset = make_train_loader(
        train, cfg, world_size=t.world_size, rank=t.rank)
    valid, _ = filter_cuts(load_cuts(t.valid_cuts), t.sp, 0.0, float("inf"))
    if t.world_size > 1:
        valid = valid.subset(cut_ids=list(valid.ids)[t.rank::t.world_size])
    t.valid_loader = make_valid_loader(valid, cfg.max_duration)


def worker(variant: str, info: dict, num_workers: int) -> None:
    """One rank: the Trainer's model and data as ``variant`` sets them up, then a batch."""
    started = _process_start()
    import torch

    torch.set_num_threads(1)
    from zipasr.train.config import TrainConfig
    from zipasr.train.trainer import Trainer

    with tempfile.TemporaryDirectory() as exp:
        t = Trainer(TrainConfig(num_workers=num_workers), {"preset": "xs"},
                    train_cuts=[Path(p) for p in info["train"]], valid_cuts=[Path(info["dev"])],
                    bpe_model=Path(info["bpe"]), exp_dir=Path(exp), progress=False)
        t._build()  # the model, DDP and the process group
        built, baseline = time.time() - started, _rss_mb()
        cpu_built = sum(resource.getrusage(resource.RUSAGE_SELF)[:2])
        if variant == "eager":
            _eager_data(t)
        else:
            t._data()
        ready = time.time() - started
        t.sampler.set_epoch(0)
        t.train_dataset.epoch = 0
        batch = next(iter(t.train_loader))
        first = time.time() - started
        assert "load_error" not in batch, batch.get("load_error")
        usage = resource.getrusage(resource.RUSAGE_SELF)
        peak, cpu = usage.ru_maxrss / 1024, usage.ru_utime + usage.ru_stime
        print(json.dumps({"rank": t.rank, "built": built, "ready": ready, "first": first,
                          "cpu": cpu, "cpu_built": cpu_built, "peak": peak,
                          "baseline": baseline, "batch_cuts": int(batch["inputs"].shape[0]),
                          "batch_seconds": float(batch["supervisions"]["num_frames"].sum())
                          / 100}), flush=True)
        t._barrier()


def _process_start() -> float:
    """This process's start time (wall clock), from /proc."""
    with open("/proc/self/stat") as f:
        ticks = int(f.read().rsplit(")", 1)[1].split()[19])
    with open("/proc/uptime") as f:
        uptime = float(f.read().split()[0])
    return time.time() - uptime + ticks / os.sysconf("SC_CLK_TCK")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_variant(variant: str, info_path: Path, world_size: int, num_workers: int) -> list[dict]:
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()),
               WORLD_SIZE=str(world_size), OMP_NUM_THREADS="1")
    procs = []
    for rank in range(world_size):
        e = dict(env, RANK=str(rank), LOCAL_RANK=str(rank))
        if world_size == 1:
            for k in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK"):
                e.pop(k)
        procs.append(subprocess.Popen(
            [sys.executable, __file__, "--worker", variant, "--info", str(info_path),
             "--num-workers", str(num_workers)], env=e, stdout=subprocess.PIPE, text=True))
    rows = []
    for p in procs:
        out, _ = p.communicate()
        if p.returncode != 0:
            raise SystemExit(f"{variant} rank failed ({p.returncode})")
        rows.append(json.loads(out.strip().splitlines()[-1]))
    return sorted(rows, key=lambda r: r["rank"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out-dir", type=Path, default=None,
                    help="where the generated corpus goes (reused if there; default: a new "
                         "temporary directory, removed at the end)")
    ap.add_argument("--cuts", type=int, default=None,
                    help="train cuts to generate (default LibriSpeech 960 h x 3: 843,723)")
    ap.add_argument("--world-size", type=int, default=2, help="DDP ranks (gloo processes)")
    ap.add_argument("--num-workers", type=int, default=0, help="DataLoader workers per rank")
    ap.add_argument("--variants", nargs="+", default=["eager", "lazy"],
                    choices=["eager", "lazy"])
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--info", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.worker, json.loads(args.info.read_text()), args.num_workers)
        return

    full = sum(PARTS.values()) * (1 + len(SPEEDS))
    scale = 1.0 if args.cuts is None else args.cuts / full
    with tempfile.TemporaryDirectory(prefix="zipasr-data-scale-") as tmp:
        out = args.out_dir or Path(tmp)
        t0 = time.perf_counter()
        info = make_corpus(out, scale)
        print(f"corpus in {out}: {info['cuts']:,} train cuts in {len(info['train'])} manifests "
              f"({info['bytes'] / 2**20:.0f} MB gzipped), {info['hours']:,.0f} h, mean "
              f"duration {info['mean_duration']:.2f} s before perturbation; "
              f"{time.perf_counter() - t0:.0f} s (generated in {info['seconds']} s)")
        results = {v: run_variant(v, out / "corpus.json", args.world_size, args.num_workers)
                   for v in args.variants}
        cols = [(v, r) for v in args.variants for r in results[v]]
        print(f"\n{args.world_size} rank(s), DataLoader workers {args.num_workers}, "
              f"max_duration 1000 s, 30 buckets, buffer 150,000 cuts")
        print(" " * 22 + "".join(f"{v + ' r' + str(r['rank']):>13}" for v, r in cols))
        for key, label, fmt in (("built", "model ready (s)", "{:13.1f}"),
                                ("ready", "start-up (s)", "{:13.1f}"),
                                ("first", "first batch (s)", "{:13.1f}"),
                                ("cpu_built", "CPU: model ready (s)", "{:13.1f}"),
                                ("cpu", "CPU: first batch (s)", "{:13.1f}"),
                                ("peak", "peak RSS (MB)", "{:13.0f}"),
                                ("baseline", "baseline RSS (MB)", "{:13.0f}"),
                                ("batch_cuts", "first batch: cuts", "{:13d}"),
                                ("batch_seconds", "first batch: seconds", "{:13.0f}")):
            print(f"{label:22}" + "".join(fmt.format(r[key]) for _, r in cols))
        if "lazy" in results:
            lazy = results["lazy"]
            ok = all(r["first"] <= 60 and r["peak"] <= 1024 for r in lazy)
            print(f"\nlazy: first batch within 60 s and peak RSS under 1 GB on every rank: "
                  f"{'yes' if ok else 'NO'}")
        if not math.isclose(scale, 1.0):
            print(f"(a corpus at {scale:.4f} of full size)")


if __name__ == "__main__":
    main()
