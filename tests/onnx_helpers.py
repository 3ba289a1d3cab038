"""Test helpers for the ONNX export: sherpa-onnx recognizers over an exported directory, and the
comparison of their transcripts with `zipasr decode`'s result files (tests/test_dag.py,
tests/deploy/)."""

from __future__ import annotations

import ast
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from zipasr.decode.scoring import error_stats


def recognizer(onnx_dir: Path, method: str, beam: int = 4, int8: bool = False,
               online: bool = False) -> Any:
    """sherpa-onnx's transducer recognizer on the exported files (one thread): the offline
    one, or with ``online`` the streaming ``OnlineRecognizer``."""
    import sherpa_onnx

    suffix = ".int8" if int8 else ""
    cls = sherpa_onnx.OnlineRecognizer if online else sherpa_onnx.OfflineRecognizer
    return cls.from_transducer(
        encoder=str(onnx_dir / f"encoder{suffix}.onnx"),
        decoder=str(onnx_dir / f"decoder{suffix}.onnx"),
        joiner=str(onnx_dir / f"joiner{suffix}.onnx"),
        tokens=str(onnx_dir / "tokens.txt"), num_threads=1, sample_rate=16000,
        feature_dim=80, decoding_method=method, max_active_paths=beam)


def sherpa_decode(rec: Any, waves: Sequence[np.ndarray], sample_rate: int = 16000) -> list[Any]:
    """Results of one ``decode_streams`` call over all waves (sherpa pads them into one batch,
    as `zipasr decode` pads the cuts of a batch)."""
    streams = []
    for w in waves:
        s = rec.create_stream()
        s.accept_waveform(sample_rate, np.ascontiguousarray(w, dtype=np.float32))
        streams.append(s)
    rec.decode_streams(streams)
    return [s.result for s in streams]


def result_ids(result: Any, tokens_txt: Path) -> list[int]:
    """Token ids of a sherpa result (it reports pieces with the leading ▁ as a space)."""
    table = {}
    for line in tokens_txt.read_text().splitlines():
        piece, idx = line.rsplit(" ", 1)
        table[piece] = int(idx)
    return [table[t.replace(" ", "▁")] for t in result.tokens]


def sherpa_stream_decode(rec: Any, waves: Sequence[np.ndarray], tail: float,
                         together: bool = False, piece: float = 0.1,
                         sample_rate: int = 16000) -> tuple[list[Any], list[int]]:
    """Streaming recognition as an application does it: each wave, then ``tail`` seconds of
    silence, fed in ``piece``-second pieces, decoding whenever a chunk is ready, then
    ``input_finished()`` after its last piece. ``together``: all waves in lockstep,
    the ready streams decoded as one batch (``decode_streams``, as a server does), else one
    stream after the other. Returns (results, number of chunks each stream decoded)."""
    padded = [np.concatenate([w, np.zeros(round(tail * sample_rate), np.float32)])
              for w in waves]
    streams = [rec.create_stream() for _ in padded]
    chunks = [0] * len(streams)

    def decode(group: list[int]) -> None:
        while ready := [i for i in group if rec.is_ready(streams[i])]:
            for i in ready:
                chunks[i] += 1
            rec.decode_streams([streams[i] for i in ready])

    step = round(piece * sample_rate)
    groups = [list(range(len(streams)))] if together else [[i] for i in range(len(streams))]
    for group in groups:
        for start in range(0, max(len(padded[i]) for i in group), step):
            for i in group:
                if start < len(padded[i]):
                    streams[i].accept_waveform(sample_rate, padded[i][start:start + step])
                    if start + step >= len(padded[i]):
                        streams[i].input_finished()
            decode(group)
    return [rec.get_result_all(s) for s in streams], chunks


def write_numbered_tokens(path: Path, vocab_size: int) -> Path:
    """A tokens.txt in icefall's layout whose pieces are ``▁T<id>`` (no BPE model needed; a
    result's text is then "T<id> T<id> ...")."""
    path.write_text("\n".join(["<blk> 0", "<sos/eos> 1", "<unk> 2"]
                              + [f"▁T{i} {i}" for i in range(3, vocab_size)]) + "\n")
    return path


def read_recogs(path: Path) -> dict[str, tuple[list[str], list[str]]]:
    """``recogs-*.txt`` of `zipasr decode`: cut id -> (reference words, hypothesis words)."""
    out: dict[str, dict[str, list[str]]] = {}
    for line in path.read_text().splitlines():
        cut_id, rest = line.split(":\t", 1)
        kind, words = rest.split("=", 1)
        out.setdefault(cut_id, {})[kind] = ast.literal_eval(words)
    return {k: (v["ref"], v["hyp"]) for k, v in out.items()}


@dataclass
class Agreement:
    """sherpa-onnx against `zipasr decode` on one test set and method."""

    n: int
    identical: float  # fraction of utterances with the same hypothesis
    wer_sherpa: float  # percent
    wer_zipasr: float

    def __str__(self) -> str:
        return (f"{self.n} utts, identical {100 * self.identical:.1f} %, WER sherpa "
                f"{self.wer_sherpa:.2f} % vs zipasr {self.wer_zipasr:.2f} %")


def agreement(recogs: dict[str, tuple[list[str], list[str]]],
              sherpa_texts: dict[str, str]) -> Agreement:
    assert set(sherpa_texts) == set(recogs), "sherpa decoded other cuts than zipasr decode"
    ids = sorted(recogs)
    ours = [(i, recogs[i][0], sherpa_texts[i].split()) for i in ids]
    theirs = [(i, recogs[i][0], recogs[i][1]) for i in ids]
    same = sum(sherpa_texts[i].split() == recogs[i][1] for i in ids)
    return Agreement(len(ids), same / len(ids), error_stats(ours).wer, error_stats(theirs).wer)
