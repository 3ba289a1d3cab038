"""The embedded default corpus: English speech synthesized offline with espeak-ng.

Text comes from :mod:`zipasr.data.synth.sentences`; speech from libespeak-ng shipped by the PyPI
package ``espeakng-loader`` (driven through ctypes, no apt, no network), resampled from 22.05 kHz
with ``soxr``, stored as 16-bit FLAC, described by lhotse manifests named like lhotse's
LibriSpeech recipe output (``{prefix}_recordings_{split}.jsonl.gz`` and
``{prefix}_supervisions_{split}.jsonl.gz``).

Voices are accent x variant pairs ("en-gb-scotland+f3"). The dev and test voice pairs never
occur in training (every accent and every variant still does), and no sentence occurs in two
splits, so the held-out sets measure generalization to unseen voices and unseen sentences (the
second is the harder one: BENCHMARKS.md). Rate, pitch, pitch range and volume vary per
utterance.

Determinism: libespeak-ng keeps internal state (flutter/noise phase) across calls, so an
utterance's samples depend on what the process synthesized before it; the *sequence* is
reproducible in a fresh process. The corpus is therefore cut into fixed shards of
:data:`SHARD_SIZE` utterances (independent of ``num_jobs``), each synthesized in order in its
own fresh worker process: the same seed gives byte-identical audio and manifests whatever
``num_jobs`` is.

Atomicity and reruns: every audio file is written to a temporary name and renamed; a finished
shard leaves a small ``.shard-NNNN.json`` record (keyed by a hash of everything that determines
its bytes) and a rerun reuses shards whose record matches. Manifests are written last, each
atomically, so an interrupted build leaves no manifest at all.
"""

from __future__ import annotations

import ctypes
import gzip
import hashlib
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from zipasr.data.synth.sentences import generate_sentences
from zipasr.errors import ZipasrError
from zipasr.io import atomic_path, write_text_atomic

__all__ = [
    "ACCENTS",
    "DEFAULT_SIZES",
    "SHARD_SIZE",
    "SPLITS",
    "VARIANTS",
    "Espeak",
    "EspeakError",
    "VoiceError",
    "corpus_summary",
    "Utterance",
    "Voice",
    "plan_corpus",
    "split_voices",
    "synthesize_corpus",
]

SPLITS = ("train", "dev", "test")
# Utterances per split of the default corpus (9.5 h of training speech). These are the defaults
# of plan_corpus, synthesize_corpus and `zipasr synth`; config/config.yaml's corpus.synth gives
# the DAG the same numbers (tests/test_config_schema_fields.py holds them equal), and the
# schema gives none.
DEFAULT_SIZES = {"num_train": 16500, "num_dev": 300, "num_test": 300}
SHARD_SIZE = 200  # a fresh interpreter per shard costs ~0.4 s CPU: keep shards few
ESPEAK_RATE = 22050
# Bump when a change alters the audio bytes, so reruns do not reuse stale shards.
SYNTH_VERSION = 3

# espeak-ng 1.52 English voices with native (non-mbrola) data; "en" is British ("en-gb" is
# rejected by SetVoiceByName in 1.52).
ACCENTS = ("en-us", "en", "en-gb-scotland", "en-gb-x-rp", "en-gb-x-gbclan", "en-gb-x-gbcwmd",
           "en-029", "en-us-nyc")
# Variants that sound like a plain human voice. Left out: whisper/whisperf/caleb (unvoiced),
# croak, robosoft*/UniRobot/anikaRobot/RicishayMax*/Demonic/announcer/Alicia/Marco (echo or
# robotic), Storm (forces en-us, overriding the accent), fast, Mr serious, Tweaky, Reed
# (breathy), iven/iven2/Jacky (very loud, clipped), kaukovalta, AnxiousAndy.
VARIANTS = (
    "m1", "m2", "m3", "m4", "m5", "m6", "m7", "m8", "f1", "f2", "f3", "f4", "f5",
    "klatt", "klatt2", "klatt3", "klatt4", "klatt5", "klatt6",
    "Alex", "Andy", "Annie", "Denis", "Gene", "Lee", "Michael", "Mike", "Nguyen", "adam",
    "antonio", "aunty", "belinda", "benjamin", "boris", "david", "ed", "edward", "gustave",
    "linda", "max", "michel", "miguel", "paul", "quincy", "rob", "robert", "steph", "travis",
    "victor", "zac", "grandma", "grandpa", "iven3",
)
RATE_RANGE = (130, 210)  # words per minute
PITCH_RANGE = (30, 70)  # espeak 0-99, 50 = the voice's default
INTONATION_RANGE = (30, 80)  # espeak pitch range 0-99, 50 = default
VOLUME_RANGE = (60, 90)  # espeak amplitude 0-200, 100 = default (loud variants clip at 100)

# espeak_PARAMETER / flags (speak_lib.h)
_RATE, _VOLUME, _PITCH, _RANGE = 1, 2, 3, 4
_SYNCHRONOUS, _DONT_EXIT, _POS_CHARACTER, _CHARS_UTF8 = 2, 0x8000, 1, 1

_FIX = ("espeak-ng comes from the PyPI package espeakng-loader: "
        "`pip install espeakng-loader==0.2.4` in the project's venv (make run does this)")


class EspeakError(ZipasrError, RuntimeError):
    """libespeak-ng could not be loaded, initialized, or asked to speak."""


class VoiceError(ZipasrError, ValueError):
    """An accent or variant espeak-ng does not know, or too few voices to hold some out."""


# ---------------------------------------------------------------------------------------------
# espeak-ng through ctypes
# ---------------------------------------------------------------------------------------------


def _espeak_paths() -> tuple[str, str]:
    """(library path, espeak-ng-data path) from espeakng-loader, or a clear EspeakError."""
    try:
        import espeakng_loader
    except ImportError as e:
        raise EspeakError(f"cannot import espeakng_loader ({e}); {_FIX}") from e
    return espeakng_loader.get_library_path(), espeakng_loader.get_data_path()


_Callback = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int,
                             ctypes.c_void_p)


class Espeak:
    """A libespeak-ng synthesizer (one per process: the library has global state)."""

    def __init__(self, rand_seed: int = 0) -> None:
        lib_path, data_path = _espeak_paths()
        try:
            self.lib = ctypes.CDLL(lib_path)
        except OSError as e:
            raise EspeakError(f"cannot load libespeak-ng from {lib_path}: {e}; {_FIX}") from e
        self.data_path = data_path
        # The path argument is the directory that *contains* espeak-ng-data.
        rate = self.lib.espeak_Initialize(_SYNCHRONOUS, 0,
                                          os.path.dirname(data_path).encode(), _DONT_EXIT)
        if rate != ESPEAK_RATE:
            raise EspeakError(f"espeak_Initialize failed (returned {rate}) with data at "
                              f"{data_path}; reinstall espeakng-loader: {_FIX}")
        # espeak_Initialize seeds espeak's noise generator (breathy variants: f2, f3, f5,
        # victor) from the clock; reseed it, and libc's rand() it also uses, for reproducible
        # output. The rest of its state (flutter phase, ...) still depends on call order.
        self.lib.espeak_ng_SetRandSeed(ctypes.c_long(rand_seed))
        ctypes.CDLL(None).srand(ctypes.c_uint(rand_seed))
        self._chunks: list[bytes] = []
        # Keep a reference: ctypes callbacks are freed when their Python object is.
        self._cb = _Callback(self._collect)
        self.lib.espeak_SetSynthCallback(self._cb)

    def _collect(self, wav, n: int, events) -> int:
        if n > 0:
            self._chunks.append(ctypes.string_at(wav, 2 * n))
        return 0  # 0 = continue

    def set_voice(self, voice: str) -> None:
        if self.lib.espeak_SetVoiceByName(voice.encode()) != 0:
            raise EspeakError(f"unknown espeak-ng voice {voice!r}")

    def synth(self, text: str, voice: str, rate: int, pitch: int, intonation: int,
              volume: int) -> np.ndarray:
        """int16 mono samples at 22.05 kHz for lowercase ``text``."""
        self.set_voice(voice)  # resets parameters, so set them after
        for param, value in ((_RATE, rate), (_PITCH, pitch), (_RANGE, intonation),
                             (_VOLUME, volume)):
            self.lib.espeak_SetParameter(param, value, 0)
        self._chunks.clear()
        data = text.encode() + b"\0"
        err = self.lib.espeak_Synth(data, len(data), 0, _POS_CHARACTER, 0, _CHARS_UTF8,
                                    None, None)
        if err != 0:
            raise EspeakError(f"espeak_Synth failed ({err}) for {text!r} with {voice}")
        return np.frombuffer(b"".join(self._chunks), dtype=np.int16)


def available_variants() -> frozenset[str]:
    """Variant names shipped in espeak-ng-data/voices/!v."""
    _, data_path = _espeak_paths()
    return frozenset(os.listdir(os.path.join(data_path, "voices", "!v")))


def check_voices(accents: Sequence[str], variants: Sequence[str]) -> None:
    """Raise VoiceError naming the first accent or variant espeak-ng does not know."""
    known = available_variants()
    for v in variants:
        if v not in known:
            raise VoiceError(f"unknown espeak-ng voice variant {v!r}; available: "
                             f"{', '.join(sorted(known))}")
    # Probing accents loads the library in *this* process, which is harmless: synthesis
    # itself always runs in fresh worker processes.
    es = Espeak()
    for a in accents:
        if es.lib.espeak_SetVoiceByName(a.encode()) != 0:
            raise VoiceError(f"unknown espeak-ng voice (accent) {a!r}; English ones: "
                             f"{', '.join(ACCENTS)}")


# ---------------------------------------------------------------------------------------------
# The plan: which sentence is spoken by which voice, how
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Voice:
    accent: str
    variant: str

    @property
    def id(self) -> str:
        return f"{self.accent}+{self.variant}"


@dataclass(frozen=True)
class Utterance:
    id: str
    text: str  # what espeak speaks (lowercase, punctuated)
    transcript: str  # the reference (uppercase)
    accent: str
    variant: str
    rate: int
    pitch: int
    intonation: int
    volume: int

    @property
    def voice(self) -> str:
        return f"{self.accent}+{self.variant}"


def split_voices(seed: int, accents: Sequence[str] = ACCENTS,
                 variants: Sequence[str] = VARIANTS, heldout_fraction: float = 0.1
                 ) -> dict[str, list[Voice]]:
    """Disjoint voice pairs per split; every accent and variant keeps training voices.

    About ``heldout_fraction`` of the accent x variant grid goes to dev and as much to test.
    """
    pairs = [Voice(a, v) for a in accents for v in variants]
    n_held = max(1, round(heldout_fraction * len(pairs)))
    if len(pairs) < 2 * n_held + 1:
        raise VoiceError(f"too few voices ({len(pairs)}) to hold out {n_held} for dev and test")
    rng = random.Random(f"voices:{seed}")
    for _ in range(1000):
        rng.shuffle(pairs)
        dev, test, train = pairs[:n_held], pairs[n_held:2 * n_held], pairs[2 * n_held:]
        if ({p.accent for p in train} == set(accents)
                and {p.variant for p in train} == set(variants)):
            key = lambda p: (p.accent, p.variant)  # noqa: E731
            return {"train": sorted(train, key=key), "dev": sorted(dev, key=key),
                    "test": sorted(test, key=key)}
    raise VoiceError("cannot hold out voices and keep every accent and variant in training")


def plan_corpus(seed: int = 0, num_train: int = DEFAULT_SIZES["num_train"],
                num_dev: int = DEFAULT_SIZES["num_dev"], num_test: int = DEFAULT_SIZES["num_test"],
                prefix: str = "synth", accents: Sequence[str] = ACCENTS,
                variants: Sequence[str] = VARIANTS) -> dict[str, list[Utterance]]:
    """Every utterance of the corpus, decided up front (cheap, in this process).

    Sentences never repeat across or within splits; voices cycle through the split's
    voice list in a shuffled order so each is used about equally.
    """
    voices = split_voices(seed, accents, variants)
    counts = {"train": num_train, "dev": num_dev, "test": num_test}
    plan: dict[str, list[Utterance]] = {}
    seen: list[str] = []
    for split in SPLITS:
        sentences = generate_sentences(counts[split], seed=f"{seed}:{split}", exclude=seen)
        seen += [s.transcript for s in sentences]
        rng = random.Random(f"prosody:{seed}:{split}")
        order: list[Voice] = []
        utts = []
        for i, s in enumerate(sentences):
            if not order:
                order = list(voices[split])
                rng.shuffle(order)
            v = order.pop()
            utts.append(Utterance(
                id=f"{prefix}-{split}-{i:05d}", text=s.text, transcript=s.transcript,
                accent=v.accent, variant=v.variant, rate=rng.randint(*RATE_RANGE),
                pitch=rng.randint(*PITCH_RANGE), intonation=rng.randint(*INTONATION_RANGE),
                volume=rng.randint(*VOLUME_RANGE)))
        plan[split] = utts
    return plan


# ---------------------------------------------------------------------------------------------
# Worker: one shard, in a fresh process
# ---------------------------------------------------------------------------------------------


def _resample(x: np.ndarray, sample_rate: int) -> np.ndarray:
    """22.05 kHz int16 -> ``sample_rate`` int16, reproducibly.

    Resampled as float32 and rounded here: for int16 output libsoxr adds TPDF dither, and with
    python-soxr 1.1.0 inputs longer than 2**16 samples then get a last ~30 ms that varies by
    1-2 LSB with the process's heap state (seen as differing bytes between two builds). The
    float path has no dither and is exact run to run.
    """
    if sample_rate == ESPEAK_RATE:
        return x
    import soxr

    y = soxr.resample(x.astype(np.float32), ESPEAK_RATE, sample_rate)
    return np.clip(np.rint(y), -32768, 32767).astype(np.int16)


def _write_audio(path: Path, samples: np.ndarray, sample_rate: int) -> None:
    import soundfile as sf

    tmp = path.with_name(f".{path.name}.tmp")
    sf.write(tmp, samples, sample_rate, format="FLAC", subtype="PCM_16")
    os.replace(tmp, path)


def _worker_main() -> None:
    """Synthesize the shard described by the JSON on stdin; print "id num_samples" lines."""
    job = json.load(sys.stdin)
    out_dir, sample_rate = Path(job["out_dir"]), job["sample_rate"]
    es = Espeak(rand_seed=job["rand_seed"])
    for u in job["utterances"]:
        x = es.synth(u["text"], f"{u['accent']}+{u['variant']}", u["rate"], u["pitch"],
                     u["intonation"], u["volume"])
        y = _resample(x, sample_rate)
        if y.size == 0 or int(np.abs(y).max()) < 100:
            raise EspeakError(f"{u['id']}: espeak produced silence for {u['text']!r}")
        _write_audio(out_dir / f"{u['id']}.flac", y, sample_rate)
        print(u["id"], y.size, flush=True)


# ---------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------


def _shards(plan: dict[str, list[Utterance]]) -> Iterator[tuple[str, int, list[Utterance]]]:
    for split in SPLITS:
        utts = plan[split]
        for k in range(0, len(utts), SHARD_SIZE):
            yield split, k // SHARD_SIZE, utts[k:k + SHARD_SIZE]


def _shard_key(utts: list[Utterance], sample_rate: int, lib_path: str) -> str:
    blob = json.dumps([SYNTH_VERSION, sample_rate, os.path.basename(lib_path),
                       [asdict(u) for u in utts]], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _run_shard(split: str, index: int, utts: list[Utterance], out_dir: Path, sample_rate: int,
               key: str, on_utt) -> dict[str, int]:
    """Synthesize one shard in a fresh interpreter; returns {utterance id: num_samples}."""
    record = out_dir / f".shard-{index:04d}.json"
    if record.exists():
        try:
            done = json.loads(record.read_text())
        except ValueError:
            done = {}
        if done.get("key") == key and all((out_dir / f"{u}.flac").exists()
                                          for u in done["num_samples"]):
            for _ in utts:
                on_utt()
            return done["num_samples"]
    job = json.dumps({"out_dir": str(out_dir), "sample_rate": sample_rate,
                      "rand_seed": int(key[:8], 16), "utterances": [asdict(u) for u in utts]})
    # A fresh interpreter per shard (not fork: libespeak-ng state must start clean; not
    # multiprocessing spawn: that re-imports the caller's __main__, e.g. the whole CLI).
    cmd = [sys.executable, "-c",
           "from zipasr.data.synth.corpus import _worker_main; _worker_main()"]
    num_samples: dict[str, int] = {}
    with tempfile.TemporaryFile("w+") as err, subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True) as proc:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(job)
        proc.stdin.close()
        for line in proc.stdout:
            uid, n = line.split()
            num_samples[uid] = int(n)
            on_utt()
        rc = proc.wait()
        if rc != 0 or len(num_samples) != len(utts):
            err.seek(0)
            tail = err.read()[-3000:]
            raise EspeakError(f"synthesis of {split} shard {index} failed (exit {rc}):\n{tail}")
    write_text_atomic(record, json.dumps({"key": key, "num_samples": num_samples}))
    return num_samples


def _write_manifest(items, path: Path) -> None:
    """Deterministic, atomic .jsonl.gz (lhotse's writer stamps the gzip header with mtime)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as raw, gzip.GzipFile(
            filename="", mode="wb", fileobj=raw, mtime=0) as f:
        for item in items:
            f.write((json.dumps(item.to_dict(), ensure_ascii=False) + "\n").encode())


def synthesize_corpus(audio_dir: Path, manifest_dir: Path, *, seed: int = 0,
                      num_train: int = DEFAULT_SIZES["num_train"],
                      num_dev: int = DEFAULT_SIZES["num_dev"],
                      num_test: int = DEFAULT_SIZES["num_test"],
                      sample_rate: int = 16000, num_jobs: int = 1, prefix: str = "synth",
                      progress: bool = True, accents: Sequence[str] = ACCENTS,
                      variants: Sequence[str] = VARIANTS) -> dict[str, dict[str, Path]]:
    """Build the synthetic corpus; return {split: {"recordings": path, "supervisions": path}}.

    Audio: ``audio_dir/{split}/{prefix}-{split}-NNNNN.flac`` (16-bit FLAC, ``sample_rate``).
    Manifests: ``manifest_dir/{prefix}_{recordings,supervisions}_{split}.jsonl.gz``, with
    audio paths as given (a relative ``audio_dir`` stays relative, like lhotse recipes).
    Supervisions: text = uppercase transcript, speaker = voice ("en-029+f3"), language
    "English", custom = accent, variant, rate, pitch, intonation, volume.
    """
    if num_jobs < 1:
        raise ZipasrError(f"num_jobs must be >= 1, got {num_jobs}")
    if min(num_train, num_dev, num_test) < 0:
        raise ZipasrError("utterance counts must be >= 0")
    from lhotse import AudioSource, Recording, RecordingSet, SupervisionSegment, SupervisionSet
    from lhotse.qa import validate_recordings_and_supervisions
    from tqdm import tqdm

    check_voices(accents, variants)
    lib_path, _ = _espeak_paths()
    audio_dir, manifest_dir = Path(audio_dir), Path(manifest_dir)
    plan = plan_corpus(seed, num_train, num_dev, num_test, prefix, accents, variants)
    out = {split: {kind: manifest_dir / f"{prefix}_{kind}_{split}.jsonl.gz"
                   for kind in ("recordings", "supervisions")} for split in SPLITS}
    # Old manifests would describe audio this build may overwrite: remove them first, so an
    # interrupted build leaves no manifest at all.
    for paths in out.values():
        for path in paths.values():
            path.unlink(missing_ok=True)
    for split in SPLITS:
        (audio_dir / split).mkdir(parents=True, exist_ok=True)
    manifest_dir.mkdir(parents=True, exist_ok=True)

    total = sum(len(u) for u in plan.values())
    bar = tqdm(total=total, desc="synthesizing", unit="utt", disable=not progress,
               file=sys.stderr, dynamic_ncols=True)
    lock = threading.Lock()

    def tick() -> None:
        with lock:
            bar.update(1)

    num_samples: dict[str, int] = {}
    shards = list(_shards(plan))
    with bar, ThreadPoolExecutor(max_workers=num_jobs) as pool:
        futures = [pool.submit(_run_shard, split, idx, utts, audio_dir / split, sample_rate,
                               _shard_key(utts, sample_rate, lib_path), tick)
                   for split, idx, utts in shards]
        try:
            for fut in futures:
                num_samples.update(fut.result())
        except BaseException:
            for fut in futures:
                fut.cancel()
            raise

    manifests = {}
    for split in SPLITS:
        recordings, supervisions = [], []
        for u in plan[split]:
            n = num_samples[u.id]
            path = audio_dir / split / f"{u.id}.flac"
            rec = Recording(id=u.id, sources=[AudioSource(type="file", channels=[0],
                                                          source=str(path))],
                            sampling_rate=sample_rate, num_samples=n,
                            duration=n / sample_rate)
            recordings.append(rec)
            supervisions.append(SupervisionSegment(
                id=u.id, recording_id=u.id, start=0.0, duration=rec.duration, channel=0,
                text=u.transcript, language="English", speaker=u.voice,
                custom={"accent": u.accent, "variant": u.variant, "rate": u.rate,
                        "pitch": u.pitch, "intonation": u.intonation, "volume": u.volume}))
        recs = RecordingSet.from_recordings(recordings)
        sups = SupervisionSet.from_segments(supervisions)
        validate_recordings_and_supervisions(recs, sups)
        manifests[split] = {"recordings": recs, "supervisions": sups}
    # All audio exists and every split validated: only now write the six manifests.
    for split in SPLITS:
        for kind, items in manifests[split].items():
            _write_manifest(items, out[split][kind])
    return out


def corpus_summary(manifests: dict[str, dict[str, Path]]) -> dict:
    """Counts, hours, voices, vocabulary and dev/test OOV rates from the written manifests."""
    from lhotse import load_manifest

    out: dict = {}
    words: dict[str, list[str]] = {}
    for split, paths in manifests.items():
        sups = load_manifest(paths["supervisions"])
        words[split] = [w for s in sups for w in s.text.split()]
        out[split] = {"utterances": len(sups),
                      "hours": round(sum(s.duration for s in sups) / 3600, 4),
                      "voices": len({s.speaker for s in sups}),
                      "words": len(words[split]), "vocabulary": len(set(words[split]))}
    train_vocab = set(words.get("train", []))
    for split in manifests:
        if split != "train" and words[split]:
            oov = sum(w not in train_vocab for w in words[split])
            out[split]["oov_rate_vs_train"] = round(oov / len(words[split]), 4)
    out["total_hours"] = round(sum(v["hours"] for v in out.values() if isinstance(v, dict)), 4)
    return out
