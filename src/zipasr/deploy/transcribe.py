"""Transcribe audio files with a trained model (``zipasr transcribe``).

Audio: anything lhotse's audio backends read (soundfile/libsndfile: WAV, FLAC, OGG, MP3; other
formats through audioread if a decoder is installed), any sample rate and channel count. It is
read with lhotse's ``Recording`` and resampled to 16 kHz with ``Recording.resample`` (the path
``zipasr decode`` takes for cuts without features), then down-mixed to mono by averaging the
channels (a mono file is passed on untouched).

Features: lhotse's ``Fbank`` with the data stage's options (:class:`~zipasr.data.fbank.FbankOptions`
defaults: 10 ms shift, no dither; as many mel bins as the model's ``feature_dim``), computed by
the same ``extract`` call ``zipasr fbank`` makes, so a 16 kHz mono file gets the features the
model was trained on (up to lilcom's storage rounding, which training saw and this does not).

Output: :class:`Transcript` per file, as a ``path<TAB>text`` line or a JSON object with token
and word start times from the encoder frame at which each token was emitted.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from zipasr.errors import ZipasrError

log = logging.getLogger(__name__)

SAMPLING_RATE = 16000
WORD_BOUNDARY = "\u2581"  # sentencepiece's "▁": a piece that starts a word


class AudioError(Exception):
    """A file that cannot be transcribed; the message says why (the caller names the file)."""


# -- audio and features ------------------------------------------------------------------------


def load_audio(path: str | Path) -> np.ndarray:
    """The file's audio as (1, num_samples) float at 16 kHz, channels averaged.

    Raises :class:`AudioError` for a missing, empty or undecodable file, or one without samples.
    """
    from lhotse import Recording

    p = Path(path)
    if not p.exists():
        raise AudioError("no such file")
    if p.is_dir():
        raise AudioError("is a directory")
    if p.stat().st_size == 0:
        raise AudioError("empty file (0 bytes)")
    try:
        rec = Recording.from_file(p)
        if rec.num_samples == 0:
            raise AudioError("no audio samples")
        if rec.sampling_rate != SAMPLING_RATE:
            rec = rec.resample(SAMPLING_RATE)
        samples = rec.load_audio()  # (channels, num_samples)
    except AudioError:
        raise
    except Exception as e:  # noqa: BLE001 - codec errors of any backend, reported per file
        raise AudioError(f"cannot decode audio ({_codec_reason(e)})") from e
    if samples.shape[0] > 1:
        # Averaging keeps the level of a signal present in every channel (a plain sum would
        # double it); training audio is mono, so there is no "training" choice to follow.
        samples = samples.mean(axis=0, keepdims=True, dtype=np.float64).astype(np.float32)
    if samples.shape[1] == 0:
        raise AudioError("no audio samples")
    return samples


def _codec_reason(e: Exception) -> str:
    """A one-line reason from lhotse's AudioLoadingError (which lists every backend it tried:
    libsndfile's message is the informative one) or any other exception."""
    text = str(e)
    m = re.search(r"LibsndfileError'>: (.+)", text)
    if m:
        return m.group(1).strip()
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[0].strip() if lines else type(e).__name__


def compute_features(extractor: Any, samples: np.ndarray) -> Tensor:
    """(1, num_samples) 16 kHz audio -> (T, num_mel_bins) float32 log-mel features."""
    return torch.from_numpy(extractor.extract(samples, SAMPLING_RATE))


# -- the model's output frame rate ---------------------------------------------------------------


def output_frame_shift(model: Any, feature_frame_shift: float) -> float:
    """Seconds between two encoder output frames: the feature frame shift times the model's
    time subsampling, read from its modules (Conv-Embed's time strides, 2; the encoder's
    output downsampling, 2), so a model with other strides gets its own value."""
    embed_stride = 1
    for m in model.encoder_embed.modules():
        if isinstance(m, torch.nn.Conv2d):
            embed_stride *= m.stride[0]  # dim 0 of the (time, freq) kernel: time
    return feature_frame_shift * embed_stride * int(model.encoder.output_downsampling_factor)


# -- results -----------------------------------------------------------------------------------


@dataclass
class Transcript:
    """One file's result. ``timestamps[k]``: start time of ``pieces[k]`` in seconds (its
    emitting encoder frame x the output frame shift); ``words``: (word, start of its first
    piece)."""

    path: str
    duration: float  # seconds of audio
    text: str
    token_ids: list[int] = field(default_factory=list)
    pieces: list[str] = field(default_factory=list)
    timestamps: list[float] = field(default_factory=list)
    words: list[tuple[str, float]] = field(default_factory=list)

    def line(self) -> str:
        """``path<TAB>text``: ``cut -f2`` gives the text, ``grep`` finds a file or a word."""
        return f"{self.path}\t{self.text}"

    def to_json(self) -> dict[str, Any]:
        return {
            "file": self.path,
            "duration": round(self.duration, 4),
            "text": self.text,
            "tokens": self.pieces,
            "token_ids": self.token_ids,
            "timestamps": self.timestamps,
            "words": [{"word": w, "start": s} for w, s in self.words],
        }


def group_words(pieces: Sequence[str], starts: Sequence[float], sp: Any,
                token_ids: Sequence[int]) -> list[tuple[str, float]]:
    """Words from sentencepiece pieces: a piece starting with "▁" begins a word, the others
    continue it; an unknown piece is a word of its own (sentencepiece decodes it as " ⁇ ");
    a word's start is its first piece's. Word texts are sentencepiece's decoding of their
    pieces, so the words are the transcript's words."""
    groups: list[list[int]] = []  # indices into pieces
    after_unk = False
    for k, piece in enumerate(pieces):
        unk = sp.is_unknown(token_ids[k])
        if piece.startswith(WORD_BOUNDARY) or not groups or unk or after_unk:
            groups.append([k])
        else:
            groups[-1].append(k)
        after_unk = unk
    words: list[tuple[str, float]] = []
    pending: int | None = None  # first piece of a group that decoded to nothing (a lone "▁")
    for g in groups:
        text = sp.decode([token_ids[k] for k in g]).strip()
        first = g[0] if pending is None else pending
        if not text:
            pending = first
            continue
        pending = None
        words.append((text, starts[first]))
    return words


# -- transcription -----------------------------------------------------------------------------


@dataclass
class Item:
    """A file ready to decode: features (T, F) and its audio duration in seconds."""

    index: int  # position on the command line
    path: str
    feats: Tensor
    duration: float


class Transcriber:
    """A model, its BPE model and a search method; turns batches of features into results."""

    def __init__(self, model: Any, sp: Any, *, method: str = "greedy_search", beam: int = 4,
                 device: str | torch.device = "cpu", streaming: Any = None,
                 fusion: Any = None) -> None:
        """``streaming``: a ``zipasr.decode.driver.Streaming`` for a causal model (chunk-wise
        or simulated, as ``zipasr decode``); without it a causal model hears whole files.
        ``fusion``: a ``zipasr.decode.fusion.Fusion`` (LM, LODR, hotwords) for modified beam
        search."""
        from zipasr.data.fbank import FbankOptions, fbank_extractor
        from zipasr.decode.driver import prepare_causal
        from zipasr.decode.search import check_method

        check_method(method, fusion, model)
        self.model, self.sp, self.method, self.beam = model, sp, method, beam
        self.fusion = fusion
        self.device = torch.device(device)
        prepare_causal(model, streaming)
        self.streaming = streaming
        self.extractor = fbank_extractor(num_mel_bins=int(model.config.feature_dim))
        self.frame_shift = output_frame_shift(model, FbankOptions().frame_shift)

    def features(self, path: str | Path) -> tuple[Tensor, float]:
        """(features (T, F), audio seconds) of a file; raises AudioError."""
        samples = load_audio(path)
        return compute_features(self.extractor, samples), samples.shape[1] / SAMPLING_RATE

    @torch.inference_mode()
    def decode(self, items: Sequence[Item]) -> list[Transcript]:
        """Decode one batch (padded with LOG_EPSILON, as ``zipasr decode`` pads); results in
        the order of ``items``."""
        from zipasr.decode import streaming as st
        from zipasr.decode.features import MIN_FRAMES, collate_features
        from zipasr.decode.search import search

        out: dict[int, Transcript] = {}
        s = self.streaming
        if s is not None and not s.simulated:  # chunk by chunk, as a live stream
            decoder = st.ChunkwiseDecoder(self.model, s.chunk_size, s.left_context_frames,
                                          method=self.method, beam=self.beam,
                                          num_streams=s.num_streams, device=self.device,
                                          fusion=self.fusion)
            by_index = {it.index: it for it in items}
            for i, hyp in decoder.decode((it.index, it.feats) for it in items):
                out[i] = self._transcript(by_index[i], hyp.tokens, hyp.frames)
            return [out[it.index] for it in items]
        # a causal model's tail padding gives every file frames to decode
        min_frames = 0 if self.model.config.causal else MIN_FRAMES
        ok = [it for it in items if it.feats.shape[0] >= min_frames]
        for it in items:
            if it.feats.shape[0] < min_frames:
                # Conv-Embed has no output frame for it: nothing can be said about it.
                log.warning("%s is too short to transcribe (%.3f s): empty transcript",
                            it.path, it.duration)
                out[it.index] = Transcript(it.path, it.duration, "")
        if ok:
            if s is not None:  # simulated streaming
                enc, enc_lens = st.simulated_encoder(
                    self.model, [it.feats for it in ok], s.chunk_size, self.device)
            else:
                x, x_lens = collate_features([it.feats for it in ok])  # (N, T, F), (N,)
                if self.model.config.causal:
                    x, x_lens = st.tail_pad(x, x_lens)
                enc, enc_lens = self.model.forward_encoder(x.to(self.device),
                                                           x_lens.to(self.device))
            hyps = search(self.model, enc, enc_lens, self.method, beam=self.beam,
                          fusion=self.fusion)
            for it, hyp in zip(ok, hyps, strict=True):
                out[it.index] = self._transcript(it, hyp.tokens, hyp.frames)
        return [out[it.index] for it in items]

    def _transcript(self, it: Item, tokens: list[int], frames: list[int]) -> Transcript:
        pieces = [self.sp.id_to_piece(t) for t in tokens]
        # rounded to 0.1 ms: the frame shift (40 ms) x an int, without float noise digits
        starts = [round(f * self.frame_shift, 4) for f in frames]
        # whitespace normalised: sentencepiece puts spaces around an unknown piece's " ⁇ "
        text = " ".join(self.sp.decode(tokens).split())
        return Transcript(it.path, it.duration, text, list(tokens), pieces, starts,
                          group_words(pieces, starts, self.sp, tokens))


def batches(items: Iterable[Item], max_duration: float) -> Iterator[list[Item]]:
    """Consecutive items grouped while (count x longest duration), the padded batch's seconds,
    stays <= max_duration (lhotse's rule, as ``zipasr decode`` batches); a batch holds at least
    one item, and max_duration <= 0 gives one item per batch."""
    batch: list[Item] = []
    longest = 0.0
    for it in items:
        new_longest = max(longest, it.duration)
        if batch and (max_duration <= 0 or (len(batch) + 1) * new_longest > max_duration):
            yield batch
            batch, new_longest = [], it.duration
        batch.append(it)
        longest = new_longest
    if batch:
        yield batch


def transcribe_files(transcriber: Transcriber, paths: Sequence[str], *,
                     max_duration: float = 0.0,
                     on_result: Callable[[Transcript], None],
                     on_error: Callable[[str, str], None]) -> int:
    """Transcribe ``paths`` in order; ``on_result`` gets each transcript (in input order),
    ``on_error(path, reason)`` each file that could not be read. Returns the failure count.

    Files are read lazily, so at most one batch of features is held in memory.
    """
    failures = 0

    def items() -> Iterator[Item]:
        nonlocal failures
        for i, path in enumerate(paths):
            try:
                feats, seconds = transcriber.features(path)
            except AudioError as e:
                failures += 1
                on_error(path, str(e))
                continue
            yield Item(i, path, feats, seconds)

    for batch in batches(items(), max_duration):
        for t in transcriber.decode(batch):
            on_result(t)
    return failures


def load_transcriber(model_path: Path, bpe_model: Path, *, model_config: dict | None = None,
                     vocab_size: int | None = None, method: str = "greedy_search", beam: int = 4,
                     device: str | torch.device = "cpu", streaming: Any = None,
                     fusion: Callable[[Any], Any] | None = None) -> Transcriber:
    """Load the model (``zipasr decode``'s loader: checkpoint, averaged model or icefall's
    pretrained.pt with a config) and the BPE model; check that their vocabularies agree.
    ``fusion(sp)`` builds the search's LM/hotword fusion once the BPE model is loaded."""
    import sentencepiece as spm

    from zipasr.decode.model import load_model

    if not Path(bpe_model).is_file():
        raise ZipasrError(f"BPE model {bpe_model} does not exist")
    sp = spm.SentencePieceProcessor(model_file=str(bpe_model))
    model = load_model(model_path, model_config, vocab_size=vocab_size or sp.get_piece_size(),
                       device=device)
    if model.config.vocab_size != sp.get_piece_size():
        raise ZipasrError(f"model vocab size {model.config.vocab_size} != BPE model's "
                          f"{sp.get_piece_size()} ({bpe_model})")
    return Transcriber(model, sp, method=method, beam=beam, device=device, streaming=streaming,
                       fusion=None if fusion is None else fusion(sp))


def format_json(t: Transcript) -> str:
    """One JSON object on one line (JSON Lines), non-ASCII kept as is."""
    return json.dumps(t.to_json(), ensure_ascii=False)
