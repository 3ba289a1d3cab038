"""Streaming decoding of a causal Zipformer: chunk by chunk with cached states, and its
whole-utterance simulation.

A causal model (``model.causal: true``) trains with a chunk-wise causal attention mask and
chunk-causal convolutions; at decoding time it is given one chunk size C and one left context
L (both in 50 Hz encoder-input frames, icefall's ``--chunk-size`` / ``--left-context-frames``):

* **chunk-wise** (:class:`ChunkwiseDecoder`, icefall's ``streaming_decode.py``): the
  features are fed 2C frames (10 ms each) at a time, plus 13 frames of look-ahead that
  Conv-Embed (7) and its ConvNeXt (2 x 3) consume; each chunk gives C / 2 encoder frames at
  25 Hz, the layers' attention keys/values, convolution and embed caches carry the past, and
  the search (greedy or modified beam) carries its hypotheses from chunk to chunk. Many
  utterances run as one batch of streams, joining and leaving as they start and finish.
* **simulated** (:func:`simulated_encoder`, icefall's ``decode.py`` on a causal model): the
  whole utterance in one forward with the chunk mask. It sees exactly what chunk-wise
  decoding sees, so the two give the same encoder output (to rounding) and the same tokens:
  the test of the chunk-wise machinery.

Both decode the same frames: the utterance's features, then ``TAIL_PAD_FRAMES`` frames of
``LOG_EPSILON`` (icefall's ``tail_pad_len``: the last words need right context to be emitted,
which a live stream gets from the silence that follows), then ``LOG_EPSILON`` up to a whole
number of chunks plus the look-ahead; every encoder frame of every chunk is searched.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from zipasr.decode.fusion import Fusion
from zipasr.decode.names import BEAM_METHODS
from zipasr.decode.search import (
    BeamStream,
    GreedyStream,
    SearchResult,
    beam_advance,
    check_method,
    greedy_advance,
)
from zipasr.errors import ZipasrError
from zipasr.model.config import check_chunking

TAIL_PAD_FRAMES = 30  # icefall's tail padding of a causal model's features (decode.py)
LOG_EPSILON = math.log(1e-10)  # lhotse's and icefall's padding value of log-mel features
EMBED_LOOKAHEAD = 7 + 2 * 3  # Conv-Embed's (T - 7) // 2, then ConvNeXt's 3 frames at 50 Hz


def configure(model: Any, chunk_size: int, left_context_frames: int) -> None:
    """Set a causal model to decode with one chunk size and left context (checked)."""
    check_chunking(model.config, chunk_size, left_context_frames)
    model.encoder.chunk_size = [chunk_size]
    model.encoder.left_context_frames = [left_context_frames]


def full_context(model: Any) -> None:
    """Set a causal model to see whole utterances (chunk size -1, one of its training draws)."""
    model.encoder.chunk_size = [-1]
    model.encoder.left_context_frames = [-1]


def tail_pad(x: Tensor, x_lens: Tensor) -> tuple[Tensor, Tensor]:
    """A padded batch (N, T, F) with ``TAIL_PAD_FRAMES`` more frames of ``LOG_EPSILON`` after
    each utterance, counted as its frames: how a causal model decodes whole utterances
    (icefall's decode.py), so that its last words get the right context they were trained
    with."""
    x = torch.nn.functional.pad(x, (0, 0, 0, TAIL_PAD_FRAMES), value=LOG_EPSILON)
    return x, x_lens + TAIL_PAD_FRAMES


def num_chunks(num_frames: int, chunk_size: int) -> int:
    """Chunks needed for ``num_frames`` feature frames plus the tail padding."""
    return max(1, math.ceil((num_frames + TAIL_PAD_FRAMES) / (2 * chunk_size)))


def pad_features(features: Tensor, chunk_size: int) -> tuple[Tensor, int]:
    """(T, F) features -> ((2 * chunk_size * K + 13, F), K): tail padding, then padding to K
    whole chunks plus the look-ahead, all ``LOG_EPSILON``."""
    k = num_chunks(features.shape[0], chunk_size)
    total = 2 * chunk_size * k + EMBED_LOOKAHEAD
    pad = features.new_full((total - features.shape[0], features.shape[1]), LOG_EPSILON)
    return torch.cat([features, pad]), k


def simulated_encoder(model: Any, features: list[Tensor], chunk_size: int,
                      device: str | torch.device = "cpu") -> tuple[Tensor, Tensor]:
    """Whole utterances through a causal model configured for ``chunk_size``:
    (encoder_out (N, T', C), lengths (N,)), lengths = the frames chunk-wise decoding gives
    (C / 2 per chunk; the forward's last frames, beyond the look-ahead, are dropped)."""
    padded = [pad_features(f, chunk_size) for f in features]
    lens = torch.tensor([p.shape[0] for p, _ in padded])
    x = torch.full((len(padded), int(lens.max()), features[0].shape[1]), LOG_EPSILON)
    for i, (p, _) in enumerate(padded):
        x[i, : p.shape[0]] = p
    encoder_out, _ = model.forward_encoder(x.to(device), lens.to(device))
    out_lens = torch.tensor([k * chunk_size // 2 for _, k in padded], device=encoder_out.device)
    return encoder_out[:, : int(out_lens.max())], out_lens


def state_batch_dims(num_states: int) -> list[int]:
    """The batch axis of each streaming state of ``Transducer.get_init_states``: per layer
    cached_key, cached_nonlin_attn, cached_val1, cached_val2 (axis 1), cached_conv1/2
    (axis 0); then the embed cache and processed_lens (axis 0)."""
    assert (num_states - 2) % 6 == 0, num_states
    return [1, 1, 1, 1, 0, 0] * ((num_states - 2) // 6) + [0, 0]


@dataclass
class _Stream:
    key: Any
    features: Tensor  # padded, (2 * chunk * num_chunks + 13, F)
    num_chunks: int
    search: GreedyStream | BeamStream
    done: int = 0


@dataclass
class ChunkStats:
    """Wall time of each chunk step and the streams it served (latency measurements)."""

    seconds: list[float] = field(default_factory=list)
    streams: list[int] = field(default_factory=list)


class ChunkwiseDecoder:
    """Chunk-wise streaming decoding of many utterances, ``num_streams`` at a time.

    ``decode(items)`` takes ``(key, features (T, 80))`` pairs and yields ``(key,
    SearchResult)`` as utterances finish (not in input order). Token frames in the results
    count 25 Hz encoder frames from the utterance's start."""

    def __init__(self, model: Any, chunk_size: int, left_context_frames: int,
                 method: str = "greedy_search", beam: int = 4, num_streams: int = 50,
                 device: str | torch.device = "cpu", fusion: Fusion | None = None):
        check_method(method, fusion, model)
        if method not in ("greedy_search", *BEAM_METHODS):
            raise ZipasrError(f"{method} decodes whole utterances: chunk-wise streaming "
                              f"decodes with greedy_search or {', '.join(BEAM_METHODS)}")
        configure(model, chunk_size, left_context_frames)
        self.model, self.chunk, self.method, self.beam = model, chunk_size, method, beam
        self.fusion = fusion
        self.num_streams = max(1, num_streams)
        self.device = torch.device(device)
        self.stats = ChunkStats()

    def _start(self, key: Any, features: Tensor) -> _Stream:
        padded, k = pad_features(features.float(), self.chunk)
        search = (GreedyStream.start(self.model) if self.method == "greedy_search"
                  else BeamStream.start(self.model, self.fusion))
        return _Stream(key, padded, k, search)

    @torch.inference_mode()
    def decode(self, items: Iterable[tuple[Any, Tensor]]) -> Iterator[tuple[Any, SearchResult]]:
        model, chunk = self.model, self.chunk
        context_size = model.decoder.context_size
        pending = iter(items)
        active: list[_Stream] = []
        states: list[Tensor] = []
        dims: list[int] = []
        exhausted = False
        while True:
            new = []
            while not exhausted and len(active) + len(new) < self.num_streams:
                item = next(pending, None)
                if item is None:
                    exhausted = True
                else:
                    new.append(self._start(*item))
            if new:
                init = model.get_init_states(len(new), self.device)
                dims = state_batch_dims(len(init))
                states = init if not active else [
                    torch.cat([s, n], dim=d) for s, n, d in zip(states, init, dims, strict=True)
                ]
                active += new
            if not active:
                return
            t0 = time.perf_counter()
            x = torch.stack([s.features[2 * chunk * s.done : 2 * chunk * (s.done + 1)
                                        + EMBED_LOOKAHEAD] for s in active]).to(self.device)
            x_lens = torch.full((len(active),), x.shape[1], device=self.device)
            out, out_lens, states = model.streaming_forward_encoder(x, x_lens, states)
            searches = [s.search for s in active]
            if self.method == "greedy_search":
                greedy_advance(model, searches, out, out_lens)  # type: ignore[arg-type]
            else:
                beam_advance(model, searches, out, out_lens, beam=self.beam,  # type: ignore[arg-type]
                             fusion=self.fusion)
            self.stats.seconds.append(time.perf_counter() - t0)
            self.stats.streams.append(len(active))
            keep = []
            for i, s in enumerate(active):
                s.done += 1
                if s.done == s.num_chunks:
                    search = s.search
                    yield s.key, (search.result(context_size, self.fusion)
                                  if isinstance(search, BeamStream)
                                  else search.result(context_size))
                else:
                    keep.append(i)
            if len(keep) < len(active):
                index = torch.tensor(keep, dtype=torch.int64, device=self.device)
                states = [s.index_select(d, index) for s, d in zip(states, dims, strict=True)]
                active = [active[i] for i in keep]
