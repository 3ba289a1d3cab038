"""Chunk-wise streaming decoding (zipasr.decode.streaming) against its whole-utterance
simulation: the causal model's forward over the same padded features with the chunk mask,
searched by the offline search. Equal tokens and emitting frames, scores to float32 rounding,
for streams of very different lengths joining and leaving a batch, with either search."""

from __future__ import annotations

import pytest
import torch
from helpers import peaky_search_model

from zipasr.decode import streaming as st
from zipasr.decode.search import search
from zipasr.errors import ZipasrError
from zipasr.model import Transducer, ZipformerConfig

torch.set_num_threads(1)

LENGTHS = (50, 333, 120, 7, 260, 401)  # 100 Hz feature frames: 1 to 8 chunks of 16


def causal_model(seed: int = 0) -> Transducer:
    """test_search's random peaky xs model (emits long, audio-dependent sequences, so the
    comparisons are strict), causal."""
    return peaky_search_model(vocab_size=12, seed=seed, causal=True)


def features(seed: int = 3) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 80, generator=g) for n in LENGTHS]


def simulated(model: Transducer, feats: list[torch.Tensor], chunk: int, left: int,
              method: str) -> list:
    st.configure(model, chunk, left)
    with torch.inference_mode():
        enc, lens = st.simulated_encoder(model, feats, chunk)
        return search(model, enc, lens, method)


@pytest.mark.parametrize("method", ["greedy_search", "modified_beam_search"])
@pytest.mark.parametrize("chunk,left,streams", [(16, 64, 2), (32, 64, 4), (8, 32, 6)])
def test_chunkwise_equals_simulated(method: str, chunk: int, left: int, streams: int) -> None:
    model, feats = causal_model(), features()
    dec = st.ChunkwiseDecoder(model, chunk, left, method=method, num_streams=streams)
    got = dict(dec.decode(enumerate(feats)))
    want = simulated(model, feats, chunk, left, method)
    assert sorted(got) == list(range(len(feats)))
    for i, w in enumerate(want):
        assert got[i].tokens == w.tokens, i
        assert got[i].frames == w.frames, i
        assert got[i].log_prob == pytest.approx(w.log_prob, rel=1e-5, abs=1e-4)
    assert sum(len(w.tokens) for w in want) > 5 * len(feats)  # non-trivial hypotheses
    # every chunk of every utterance was one step of one stream
    assert sum(dec.stats.streams) == sum(st.num_chunks(n, chunk) for n in LENGTHS)
    assert max(dec.stats.streams) == streams and len(dec.stats.seconds) == len(dec.stats.streams)


def test_the_comparison_is_sensitive() -> None:
    """What the equality above rests on: another chunk size, or a search that forgets its
    hypotheses between chunks, gives other tokens; another left context other encoder
    frames (beyond 64 frames of left context)."""
    model, feats = causal_model(), features()
    base = dict(st.ChunkwiseDecoder(model, 16, 64).decode(enumerate(feats)))
    other = simulated(model, feats, 32, 64, "greedy_search")
    assert any(base[i].tokens != w.tokens for i, w in enumerate(other))
    encoder = []
    for left in (64, 128):
        st.configure(model, 16, left)
        with torch.inference_mode():
            encoder.append(st.simulated_encoder(model, feats[-1:], 16)[0])
    torch.testing.assert_close(encoder[0][:, :40], encoder[1][:, :40])  # 5 chunks: same
    assert not torch.allclose(encoder[0][:, 40:], encoder[1][:, 40:], rtol=1e-3, atol=1e-3)
    st.configure(model, 16, 64)
    forgetful = []
    for f in feats:  # each chunk searched from a fresh start
        padded, k = st.pad_features(f, 16)
        with torch.inference_mode():
            enc, lens = st.simulated_encoder(model, [f], 16)
        tokens = []
        for c in range(k):
            (r,) = search(model, enc[:, 8 * c : 8 * (c + 1)], torch.tensor([8]), "greedy_search")
            tokens += r.tokens
        forgetful.append(tokens)
    assert any(base[i].tokens != t for i, t in enumerate(forgetful))


def test_padding_layout() -> None:
    """Features + 30 frames of tail padding, rounded up to whole chunks of 2C frames, plus the
    13 look-ahead frames; all padding LOG_EPSILON (log 1e-10)."""
    for n, chunk, k in [(1, 16, 1), (2, 16, 1), (3, 16, 2), (64, 16, 3), (34, 32, 1),
                        (35, 32, 2)]:
        f = torch.randn(n, 80)
        padded, got_k = st.pad_features(f, chunk)
        assert got_k == k == st.num_chunks(n, chunk)
        assert padded.shape == (2 * chunk * k + 13, 80)
        assert torch.equal(padded[:n], f)
        assert padded[n:].eq(st.LOG_EPSILON).all() and st.LOG_EPSILON == pytest.approx(-23.02585)
        assert n + st.TAIL_PAD_FRAMES <= 2 * chunk * k < n + st.TAIL_PAD_FRAMES + 2 * chunk


def test_state_batch_axes() -> None:
    model = causal_model()
    st.configure(model, 16, 64)
    one, three = model.get_init_states(1), model.get_init_states(3)
    dims = st.state_batch_dims(len(one))
    assert len(one) == 6 * sum(model.encoder.num_encoder_layers) + 2
    for a, b, d in zip(one, three, dims, strict=True):
        assert b.shape[d] == 3 and a.shape[d] == 1
        assert [s for i, s in enumerate(a.shape) if i != d] == [
            s for i, s in enumerate(b.shape) if i != d]


@pytest.mark.parametrize("changes,message", [
    ({}, "needs a causal model"),
    ({"causal": True}, None),
    ({"causal": True, "chunk": 12}, "multiple of every downsampling factor"),
    ({"causal": True, "left": 40}, "multiple of the chunk size"),
    ({"causal": True, "chunk": 8, "left": 8}, "shorter than the convolutions"),
])
def test_check_chunking(changes: dict, message: str | None) -> None:
    cfg = ZipformerConfig.from_preset("xs", causal=changes.get("causal", False))
    chunk, left = changes.get("chunk", 16), changes.get("left", 64)
    if message is None:
        st.check_chunking(cfg, chunk, left)
    else:
        with pytest.raises(ZipasrError, match=message):
            st.check_chunking(cfg, chunk, left)
