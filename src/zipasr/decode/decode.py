"""Decode lhotse cut manifests with a Zipformer transducer and score them.

Model files: a trainer checkpoint (``epoch-N.pt``/``checkpoint-B.pt``), an averaged model from
``zipasr average`` (both carry ``model_config``), or icefall's ``pretrained.pt`` (only
``{"model": ...}``: the configuration comes from a preset / JSON given on the command line).

Features: cuts with precomputed features are read from storage; cuts without are computed on
the fly with lhotse's 80-bin ``Fbank`` (the extractor the data stage uses). Batches are padded
with lhotse's ``LOG_EPSILON`` like ``K2SpeechRecognitionDataset``.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from zipasr.decode.average import strip_ddp_prefix
from zipasr.decode.names import result_key
from zipasr.decode.scoring import ErrorStats, Result, save_results
from zipasr.decode.search import search
from zipasr.errors import ZipasrError
from zipasr.train.checkpoint import load_checkpoint

log = logging.getLogger(__name__)

SAMPLING_RATE = 16000


# -- model ---------------------------------------------------------------------------------


def parse_model_config(text: str | None) -> dict[str, Any] | None:
    """``--model-config``: a JSON object, a path to a JSON/YAML file, or a preset name."""
    if text is None:
        return None
    text = text.strip()
    if text.startswith("{"):
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise ZipasrError(f"--model-config is not valid JSON: {e}") from e
    path = Path(text)
    if path.is_file():
        import yaml

        d = yaml.safe_load(path.read_text())  # YAML is a superset of JSON
        if not isinstance(d, dict):
            raise ZipasrError(f"--model-config {path}: expected a mapping")
        return d.get("model", d) if "model" in d and isinstance(d["model"], dict) else d
    return {"preset": text}


def load_model(path: str | Path, model_config: dict[str, Any] | None = None,
               vocab_size: int | None = None, device: str | torch.device = "cpu"):
    """A :class:`~zipasr.model.Transducer` in eval mode with the file's weights.

    The file's own ``model_config`` wins over ``model_config``; ``vocab_size`` fills in a
    config that does not fix it (icefall's pretrained.pt with ``--preset``).
    """
    from zipasr.model import Transducer, ZipformerConfig

    ckpt = load_checkpoint(path)
    cfg = ckpt.get("model_config") or model_config
    if ckpt.get("model_config") and model_config:
        log.info("%s carries its own model_config; the one given is not used", path)
    if cfg is None:
        raise ZipasrError(f"{path} has no model_config: give --model-config or --preset "
                          "(e.g. --preset M --vocab-size 500 for icefall's pretrained.pt)")
    cfg = dict(cfg.to_dict() if isinstance(cfg, ZipformerConfig) else cfg)
    if vocab_size is not None and "vocab_size" not in cfg:
        cfg["vocab_size"] = vocab_size
    try:
        model = Transducer.from_config(cfg)
    except (KeyError, ValueError, TypeError) as e:
        raise ZipasrError(f"bad model configuration {cfg}: {e}") from e
    state = strip_ddp_prefix(ckpt["model"])
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ZipasrError(f"{path} does not match the model configuration {cfg}: "
                          f"{str(e).splitlines()[0]} ...") from e
    return model.to(device).eval()


# -- data ----------------------------------------------------------------------------------


def set_name_from_path(cuts_path: str | Path) -> str:
    """``synth_cuts_test.jsonl.gz`` -> ``test``; ``librispeech_cuts_test-clean.jsonl.gz`` ->
    ``test-clean``; other names: the file name without its manifest extensions."""
    name = Path(cuts_path).name
    name = re.sub(r"(\.jsonl|\.json|\.yaml|\.yml)?(\.gz)?$", "", name)
    if "_cuts_" in name:
        name = name.rsplit("_cuts_", 1)[1]
    elif name.startswith("cuts_"):
        name = name[len("cuts_"):]
    return name or "cuts"


def cut_text(cut: Any) -> str:
    return " ".join(s.text or "" for s in cut.supervisions).strip()


class FeatureLoader:
    """Features of a cut, precomputed (read from storage) or computed from its audio."""

    def __init__(self) -> None:
        self._extractor = None

    def __call__(self, cut: Any) -> Tensor:
        try:
            return self._load(cut)
        except ZipasrError:
            raise
        except Exception as e:  # noqa: BLE001 - storage or codec errors, named with the cut
            # no skipping: a WER over fewer utterances than asked for would be misleading
            what = "features" if cut.has_features else "audio"
            raise ZipasrError(f"cut {cut.id}: cannot read its {what} "
                              f"({type(e).__name__}: {e})") from e

    def _load(self, cut: Any) -> Tensor:
        if cut.has_features:
            return torch.from_numpy(cut.load_features())
        if not cut.has_recording:
            raise ZipasrError(f"cut {cut.id} has neither features nor audio")
        if self._extractor is None:
            from zipasr.data.fbank import fbank_extractor

            self._extractor = fbank_extractor()
        if cut.sampling_rate != SAMPLING_RATE:
            cut = cut.resample(SAMPLING_RATE)
        return torch.from_numpy(cut.compute_features(self._extractor))


def collate_features(feats: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """Pad (T_i, 80) features into (N, T_max, 80) with LOG_EPSILON; lengths (N,)."""
    from lhotse.utils import LOG_EPSILON

    lens = torch.tensor([f.shape[0] for f in feats], dtype=torch.int64)
    x = torch.full((len(feats), int(lens.max()), feats[0].shape[1]), LOG_EPSILON,
                   dtype=torch.float32)
    for i, f in enumerate(feats):
        x[i, : f.shape[0]] = f
    return x, lens


def batches(cuts: Any, max_duration: float, loader: FeatureLoader
            ) -> Iterator[tuple[list[Any], Tensor, Tensor]]:
    """(cuts, x (N, T, 80), x_lens (N,)) batches of at most ``max_duration`` seconds.

    Cuts are taken longest first, so a batch holds similar lengths: little padding to
    compute, and little padding to leak into the results (the Zipformer's valid frames are
    not fully independent of the padding, in icefall too: Conv-Embed's receptive field and
    the downsampled stacks' partially padded frames reach into it).
    """
    from lhotse.dataset import SimpleCutSampler

    cuts = cuts.sort_by_duration(ascending=False)
    sampler = SimpleCutSampler(cuts, max_duration=max_duration, shuffle=False)
    for batch in sampler:
        batch = list(batch)
        x, x_lens = collate_features([loader(c) for c in batch])
        yield batch, x, x_lens


# -- decoding ------------------------------------------------------------------------------

MIN_FRAMES = 9  # Conv-Embed needs T >= 7 and gives ((T - 7) // 2 + 1) // 2 output frames


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

    def key(self, method: str, beam: int) -> str:
        return result_key(method, beam, self.chunk_size, self.left_context_frames,
                          self.simulated)


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
                progress: bool = False, streaming: Streaming | None = None
                ) -> tuple[list[Result], float, float]:
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
                                      num_streams=streaming.num_streams, device=device)
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
        hyps = search(model, encoder_out, encoder_out_lens, method, beam=beam)
        for cut, hyp in zip(batch, hyps, strict=True):
            results.append(_result(cut, sp.decode(hyp.tokens)))
    bar.close()
    return results, audio, time.perf_counter() - t0


def decode_and_score(model: Any, sp: Any, cuts_paths: Sequence[Path], result_dir: Path, *,
                     method: str, beam: int = 4, max_duration: float = 300.0,
                     suffix: str | None = None, test_sets: Sequence[str] | None = None,
                     device: str | torch.device = "cpu", progress: bool = False,
                     streaming: Streaming | None = None) -> list[DecodeSummary]:
    """Decode each manifest and write its recogs/errs/wer-summary files."""
    from lhotse import CutSet

    if test_sets is not None and len(test_sets) != len(cuts_paths):
        raise ZipasrError("--test-set must be given once per --cuts")
    key = result_key(method, beam) if streaming is None else streaming.key(method, beam)
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
                                           progress=progress, streaming=streaming)
        stats = save_results(result_dir, name, key, results, suffix=suffix)
        s = DecodeSummary(name, key, stats, len(cuts), audio, wall)
        log.info("%s %s: %d cuts, %.1f s of audio in %.1f s, RTF %.4f", name, key, len(cuts),
                 audio, wall, s.rtf)
        out.append(s)
    return out
