"""Decode lhotse cut manifests with a Zipformer transducer and score them: the search driver
of ``zipasr decode`` (whole utterances, simulated or chunk-wise streaming) and its results.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from zipasr.decode.features import (
    MIN_FRAMES,
    FeatureLoader,
    batches,
    cut_text,
    set_name_from_path,
)
from zipasr.decode.fusion import Fusion
from zipasr.decode.names import result_key
from zipasr.decode.scoring import ErrorStats, Result, save_results
from zipasr.decode.search import search
from zipasr.errors import ZipasrError

log = logging.getLogger(__name__)


@dataclass
class DecodeSummary:
    test_set: str
    key: str
    stats: ErrorStats
    num_cuts: int
    audio_seconds: float
    wall_seconds: float

    @property
    def rtf(self) -> float:
        return self.wall_seconds / max(self.audio_seconds, 1e-9)


@dataclass(frozen=True)
class Streaming:
    """How a causal model decodes: chunks of ``chunk_size`` 50 Hz frames with
    ``left_context_frames`` of left context, chunk-wise with cached states (``simulated``
    False) or as one whole-utterance forward with the chunk mask (True); ``num_streams``
    utterances run together chunk-wise."""

    chunk_size: int
    left_context_frames: int
    simulated: bool = False
    num_streams: int = 50


def search_key(method: str, beam: int, streaming: Streaming | None = None,
               fusion: Fusion | None = None) -> str:
    """The result key of a decoding (zipasr.decode.names.result_key): the method, the beam
    where it matters, hotwords, the LM scales of the LM methods, the streaming setting."""
    kw: dict[str, float] = {}
    if fusion is not None:
        if fusion.context is not None:
            kw["hotwords_score"] = fusion.hotwords_score
        if fusion.lm is not None:
            kw["lm_scale"] = fusion.lm_scale
        if fusion.bigram is not None:
            kw["lodr_scale"] = fusion.lodr_scale
    if streaming is None:
        return result_key(method, beam, **kw)
    return result_key(method, beam, streaming.chunk_size, streaming.left_context_frames,
                      streaming.simulated, **kw)


def prepare_causal(model: Any, streaming: Streaming | None) -> None:
    """A causal model decodes with one chunk size: the streaming one, else whole utterances
    (it draws at random from its training lists otherwise)."""
    from zipasr.decode import streaming as st

    if streaming is not None:
        st.configure(model, streaming.chunk_size, streaming.left_context_frames)
    elif model.config.causal:
        st.full_context(model)


def _result(cut: Any, hyp_text: str) -> Result:
    return cut.id, cut_text(cut).split(), hyp_text.split()


@torch.inference_mode()
def decode_cuts(model: Any, sp: Any, cuts: Any, *, method: str, beam: int = 4,
                max_duration: float = 300.0, device: str | torch.device = "cpu",
                progress: bool = False, streaming: Streaming | None = None,
                fusion: Fusion | None = None) -> tuple[list[Result], float, float]:
    """Decode every cut; returns (results (id, ref words, hyp words), audio s, wall s).

    ``streaming``: a causal model's chunk-wise decoding or its simulation. Without it a
    causal model sees whole utterances, with icefall's tail padding (decode.py)."""
    from tqdm import tqdm

    from zipasr.decode import streaming as st

    prepare_causal(model, streaming)
    loader = FeatureLoader()
    results: list[Result] = []
    audio = 0.0
    t0 = time.perf_counter()
    bar = tqdm(total=len(cuts), desc=method, unit="cut", disable=not progress)
    if streaming is not None and not streaming.simulated:
        by_id = {c.id: c for c in cuts}
        decoder = st.ChunkwiseDecoder(model, streaming.chunk_size,
                                      streaming.left_context_frames, method=method, beam=beam,
                                      num_streams=streaming.num_streams, device=device,
                                      fusion=fusion)
        for cut_id, hyp in decoder.decode((c.id, loader(c)) for c in cuts):
            bar.update(1)
            audio += by_id[cut_id].duration
            results.append(_result(by_id[cut_id], sp.decode(hyp.tokens)))
        bar.close()
        return results, audio, time.perf_counter() - t0
    for batch, x, x_lens in batches(cuts, max_duration, loader):
        bar.update(len(batch))
        audio += sum(c.duration for c in batch)
        if streaming is not None:  # simulated: the frames chunk-wise decoding sees
            encoder_out, encoder_out_lens = st.simulated_encoder(
                model, [x[i, : int(n)] for i, n in enumerate(x_lens)], streaming.chunk_size,
                device)
        else:
            if model.config.causal:
                x, x_lens = st.tail_pad(x, x_lens)
            # Conv-Embed gives no output frame for < MIN_FRAMES input frames: such a cut is
            # scored with an empty hypothesis (its words count as deletions), not fatal.
            ok = x_lens >= MIN_FRAMES
            for cut in (c for c, good in zip(batch, ok.tolist(), strict=True) if not good):
                log.warning("cut %s is too short to decode (%.3f s): empty hypothesis",
                            cut.id, cut.duration)
                results.append(_result(cut, ""))
            if not ok.any():
                continue
            batch = [c for c, good in zip(batch, ok.tolist(), strict=True) if good]
            x, x_lens = x[ok][:, : int(x_lens[ok].max())], x_lens[ok]
            encoder_out, encoder_out_lens = model.forward_encoder(x.to(device),
                                                                  x_lens.to(device))
        hyps = search(model, encoder_out, encoder_out_lens, method, beam=beam, fusion=fusion)
        for cut, hyp in zip(batch, hyps, strict=True):
            results.append(_result(cut, sp.decode(hyp.tokens)))
    bar.close()
    return results, audio, time.perf_counter() - t0


def decode_and_score(model: Any, sp: Any, cuts_paths: Sequence[Path], result_dir: Path, *,
                     method: str, beam: int = 4, max_duration: float = 300.0,
                     suffix: str | None = None, test_sets: Sequence[str] | None = None,
                     device: str | torch.device = "cpu", progress: bool = False,
                     streaming: Streaming | None = None, fusion: Fusion | None = None
                     ) -> list[DecodeSummary]:
    """Decode each manifest and write its recogs/errs/wer-summary files."""
    from lhotse import CutSet

    if test_sets is not None and len(test_sets) != len(cuts_paths):
        raise ZipasrError("--test-set must be given once per --cuts")
    key = search_key(method, beam, streaming, fusion)
    out = []
    for i, path in enumerate(cuts_paths):
        name = test_sets[i] if test_sets else set_name_from_path(path)
        try:
            # read whole, unlike training's manifests: the cuts are decoded longest first
            # (batches), which needs all of them; test sets are small (docs/data.md)
            cuts = CutSet.from_file(path).to_eager()
        except Exception as e:
            raise ZipasrError(f"cannot read cut manifest {path}: {e}") from e
        if len(cuts) == 0:
            raise ZipasrError(f"{path} has no cuts")
        results, audio, wall = decode_cuts(model, sp, cuts, method=method, beam=beam,
                                           max_duration=max_duration, device=device,
                                           progress=progress, streaming=streaming,
                                           fusion=fusion)
        stats = save_results(result_dir, name, key, results, suffix=suffix)
        s = DecodeSummary(name, key, stats, len(cuts), audio, wall)
        log.info("%s %s: %d cuts, %.1f s of audio in %.1f s, RTF %.4f", name, key, len(cuts),
                 audio, wall, s.rtf)
        out.append(s)
    return out
