"""`zipasr export-onnx --streaming`: the chunk-wise encoder meets sherpa-onnx's online
zipformer2 contract (docs/deploy.md, "Streaming"), runs in onnxruntime chunk by chunk as the
PyTorch model's streaming forward does, and sherpa-onnx's OnlineRecognizer decodes with it
token for token what PyTorch decodes from the same chunks; refusals name their reason.

Two untrained causal models: the xs preset made peaky (hypotheses with blanks, which depend on
the audio), exported at icefall's defaults (chunk 16, left context 128) with int8; and the
demo preset, whose 32-channel Conv-Embed exercises the 128-channel embed state sherpa-onnx
imposes, exported through the CLI at chunk 32, left context 64.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import ROOT, peaky_xs_model, tool_env, write_tone
from onnx_helpers import recognizer, result_ids, sherpa_stream_decode, write_numbered_tokens
from test_onnx_export import rel, tones

from zipasr.deploy.onnx_export import FP32_FILES, INT8_FILES, ort_session, read_metadata
from zipasr.deploy.onnx_streaming import (
    PAD_LENGTH,
    batch_axis,
    export_onnx_streaming,
    state_names,
)
from zipasr.errors import ZipasrError
from zipasr.model import Transducer

pytest.importorskip("sherpa_onnx")
torch.set_num_threads(1)

VOCAB = 40
# onnxruntime vs PyTorch per chunk, largest difference over the largest value (measured
# below 2e-6 for encoder_out and 7e-6 for the states, over 30 chunks)
RTOL = 1e-5
STATE_RTOL = 5e-5
WAVES = (1.3, 2.0, 0.7, 2.6)  # seconds: 2 to 8 chunks of 16, partial last chunks


def tail_seconds(chunk: int) -> float:
    """Silence appended before input_finished(): T = 2 * chunk + 13 feature frames (10 ms
    each), enough for every frame of the audio to fall in a chunk sherpa-onnx decodes."""
    return (2 * chunk + PAD_LENGTH) * 0.01


def sherpa_chunks(num_frames: int, chunk: int) -> int:
    """Chunks sherpa-onnx decodes from ``num_frames`` feature frames: chunk k (frames
    [2ck, 2ck + T)) only once more than its T frames are there (num_frames > 2ck + T)."""
    return max(0, (num_frames - PAD_LENGTH - 1) // (2 * chunk))


def set_chunking(model: Transducer, chunk: int, left: int) -> Transducer:
    model.encoder.chunk_size, model.encoder.left_context_frames = [chunk], [left]
    return model


def pytorch_streaming(model: Transducer, wave: np.ndarray, tail: float, method: str
                      ) -> tuple[list[int], int]:
    """The reference: zipasr's fbank of the wave with the same tail of silence, the PyTorch
    streaming forward over exactly the full chunks sherpa-onnx decodes, states carried, and
    zipasr's search over the chunks' concatenated output (one search over the concatenation
    is what a search carried from chunk to chunk computes). Returns (tokens, chunks)."""
    from zipasr.data.fbank import fbank_extractor
    from zipasr.decode.search import search

    chunk = model.encoder.chunk_size[0]
    T = 2 * chunk + PAD_LENGTH
    padded = np.concatenate([wave, np.zeros(round(tail * 16000), np.float32)])
    feats = torch.from_numpy(fbank_extractor().extract(padded, 16000)).unsqueeze(0)
    num_chunks = sherpa_chunks(feats.shape[1], chunk)
    states, outs = model.get_init_states(1), []
    with torch.no_grad():
        for k in range(num_chunks):
            x = feats[:, 2 * chunk * k: 2 * chunk * k + T]
            out, _, states = model.streaming_forward_encoder(x, torch.tensor([T]), states)
            outs.append(out)
        enc = torch.cat(outs, dim=1)
        (hyp,) = search(model, enc, torch.tensor([enc.shape[1]]), method, beam=4)
    return hyp.tokens, num_chunks


@pytest.fixture(scope="module")
def xs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Transducer, Path]:
    """The peaky causal xs model at chunk 16 / left 128, exported with int8."""
    from zipasr.data.fbank import fbank_extractor

    fbank = fbank_extractor()
    model = peaky_xs_model([torch.from_numpy(fbank.extract(w, 16000)) for w in tones(WAVES)],
                           VOCAB, causal=True)
    with torch.no_grad():
        # Like a trained model, never emit <sos/eos> (1) or <unk> (2): sherpa-onnx takes <unk>
        # for blank, while zipasr's search would emit it.
        model.joiner.output_linear.bias[1:3] = -30.0
    root = tmp_path_factory.mktemp("xs")
    out = root / "onnx"
    report = export_onnx_streaming(model, out, tokens=write_numbered_tokens(
        root / "tokens.txt", VOCAB))
    assert sorted(report.files) == sorted([*FP32_FILES, *INT8_FILES, "tokens.txt"])
    assert all(v <= 1e-4 for v in report.rel_diff.values()), report.rel_diff
    return set_chunking(model, 16, 128), out


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Transducer, Path]:
    """An untrained causal demo model (32-channel Conv-Embed), exported by `zipasr export-onnx
    --streaming --chunk-size 32 --left-context-frames 64` from a checkpoint file."""
    from zipasr.cli import main

    torch.manual_seed(0)
    model = Transducer.from_preset("demo", vocab_size=VOCAB, causal=True).eval()
    with torch.no_grad():
        model.joiner.output_linear.bias[1:3] = -30.0  # as above
    root = tmp_path_factory.mktemp("demo")
    ckpt = root / "epoch-1.pt"
    torch.save({"model": model.state_dict(), "model_config": model.config.to_dict()}, ckpt)
    out = root / "onnx"
    assert main(["export-onnx", "--streaming", "--chunk-size", "32", "--left-context-frames",
                 "64", "--model", str(ckpt), "--tokens",
                 str(write_numbered_tokens(root / "tokens.txt", VOCAB)), "--out-dir", str(out),
                 "--no-int8"]) == 0
    return set_chunking(model, 32, 64), out


def _io(path: Path) -> tuple[list[tuple[str, str, list]], list[tuple[str, str, list]]]:
    """(inputs, outputs) of a graph as (name, element type, shape with symbolic dims)."""
    session = ort_session(path)
    return ([(v.name, v.type, v.shape) for v in session.get_inputs()],
            [(v.name, v.type, v.shape) for v in session.get_outputs()])


@pytest.mark.parametrize("which", ["xs", "demo"])
def test_encoder_inputs_outputs_and_metadata_follow_sherpas_contract(which: str, request
                                                                    ) -> None:
    model, out = request.getfixturevalue(which)
    enc = model.encoder
    chunk, left = enc.chunk_size[0], enc.left_context_frames[0]
    T, J = 2 * chunk + 13, model.config.joiner_dim
    layers = [i for i, n in enumerate(enc.num_encoder_layers) for _ in range(n)]  # stack of each
    expected = [("x", "tensor(float)", ["N", T, 80])]
    for s in layers:
        L, C, H = left // enc.downsampling_factor[s], enc.encoder_dim[s], enc.num_heads[s]
        K = enc.cnn_module_kernel[s] // 2
        expected += [(None, "tensor(float)", shape) for shape in (
            [L, "N", enc.query_head_dim[s] * H], [1, "N", L, 3 * C // 4],
            [L, "N", enc.value_head_dim[s] * H], [L, "N", enc.value_head_dim[s] * H],
            ["N", C, K], ["N", C, K])]
    expected += [(None, "tensor(float)", ["N", 128, 3, 19]), (None, "tensor(int64)", ["N"])]
    names = ["x", *state_names(len(layers))]
    assert names[1:7] == ["cached_key_0", "cached_nonlin_attn_0", "cached_val1_0",
                          "cached_val2_0", "cached_conv1_0", "cached_conv2_0"]
    assert names[-2:] == ["embed_states", "processed_lens"] and len(names) == 6 * len(layers) + 3
    expected = [(n, t, s) for n, (_, t, s) in zip(names, expected, strict=True)]
    for suffix in ("", ".int8") if which == "xs" else ("",):
        ins, outs = _io(out / f"encoder{suffix}.onnx")
        assert ins == expected
        assert outs == [("encoder_out", "tensor(float)", ["N", chunk // 2, J])] + [
            (f"new_{n}", t, s) for n, t, s in expected[1:]]
        meta = read_metadata(out / f"encoder{suffix}.onnx")
        assert {k: meta[k] for k in ("model_type", "version", "decode_chunk_len", "T")} == {
            "model_type": "zipformer2", "version": "1", "decode_chunk_len": str(2 * chunk),
            "T": str(T)}
        assert meta["model_author"] and meta["comment"].startswith("streaming zipformer2")

        def per_stack(values) -> str:
            return ",".join(map(str, values))

        assert meta["num_encoder_layers"] == per_stack(enc.num_encoder_layers)
        assert meta["encoder_dims"] == per_stack(enc.encoder_dim)
        assert meta["cnn_module_kernels"] == per_stack(enc.cnn_module_kernel)
        assert meta["left_context_len"] == per_stack(left // d for d in enc.downsampling_factor)
        assert meta["query_head_dims"] == per_stack(enc.query_head_dim)
        assert meta["value_head_dims"] == per_stack(enc.value_head_dim)
        assert meta["num_heads"] == per_stack(enc.num_heads)
        assert len(meta["num_heads"].split(",")) == 6
    if which == "demo":  # the spelled-out values for one model
        assert (meta["left_context_len"], meta["encoder_dims"], meta["T"]) == (
            "64,32,16,8,16,32", "96,128,144,160,144,128", "77")
    dec = read_metadata(out / "decoder.onnx")
    assert (dec["vocab_size"], dec["context_size"]) == (str(VOCAB), "2")


@pytest.mark.parametrize("which", ["xs", "demo"])
def test_encoder_chunk_by_chunk_equals_pytorch_streaming(which: str, request) -> None:
    """A batch of 2 over 5 chunks in onnxruntime, states carried (sherpa's 128-channel embed
    state), against the model's own streaming_forward_encoder + encoder_proj (its own
    narrower embed state for demo); then a stream joining a running one (different
    processed_lens in one batch, as when sherpa-onnx batches streams)."""
    model, out = request.getfixturevalue(which)
    chunk = model.encoder.chunk_size[0]
    T, c3 = 2 * chunk + 13, model.config.embed_channels[2]
    session = ort_session(out / "encoder.onnx")
    names = [i.name for i in session.get_inputs()]
    g = torch.Generator().manual_seed(5)

    def onnx_init(n: int) -> list[np.ndarray]:
        *layer, embed, lens = model.get_init_states(n)
        return [s.numpy() for s in layer] + [np.zeros((n, 128, 3, 19), np.float32), lens.numpy()]

    def run(x: torch.Tensor, states: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        got, *new = session.run(None, dict(zip(names, [x.numpy(), *states], strict=True)))
        return got, new

    def torch_chunk(x: torch.Tensor, states: list[torch.Tensor]):
        with torch.no_grad():
            o, lens, new = model.streaming_forward_encoder(x, torch.full((x.shape[0],), T),
                                                           states)
            return model.joiner.encoder_proj(o).numpy(), new

    want_states, got_states = model.get_init_states(2), onnx_init(2)
    worst = worst_state = 0.0
    for k in range(5):
        x = torch.randn(2, T, 80, generator=g)
        want, want_states = torch_chunk(x, want_states)
        got, got_states = run(x, got_states)
        assert got.shape == want.shape == (2, chunk // 2, model.config.joiner_dim)
        worst = max(worst, rel(got, want))
        assert got_states[-1].tolist() == want_states[-1].tolist() == [(k + 1) * chunk] * 2
        # the embed state: the model's channels, then zeros up to sherpa's 128
        assert got_states[-2].shape == (2, 128, 3, 19)
        worst_state = max(worst_state, rel(got_states[-2][:, :c3], want_states[-2].numpy()))
        assert not got_states[-2][:, c3:].any()
        for got_s, want_s in zip(got_states[:-2], want_states[:-2], strict=True):
            assert got_s.shape == tuple(want_s.shape)
            worst_state = max(worst_state, rel(got_s, want_s.numpy()))
    print(f"{which}: onnxruntime vs PyTorch over 5 chunks (relative): encoder_out {worst:.1e}, "
          f"states {worst_state:.1e}")
    assert worst <= RTOL and worst_state <= STATE_RTOL

    # A new stream joins the running one: batch [running (5 chunks done), new], each row as
    # it would be alone.
    x = torch.randn(2, T, 80, generator=g)
    axes = [batch_axis(n) for n in names[1:]]
    joined = [np.concatenate([np.take(s, [0], axis=a), new], axis=a)
              for s, new, a in zip(got_states, onnx_init(1), axes, strict=True)]
    got, _ = run(x, joined)
    want0, _ = torch_chunk(x[:1], [s.narrow(a, 0, 1) for s, a in
                                   zip(want_states, axes, strict=True)])
    want1, _ = torch_chunk(x[1:], model.get_init_states(1))
    assert rel(got[:1], want0) <= RTOL and rel(got[1:], want1) <= RTOL
    assert rel(got[1:], want0) > 0.01  # the rows are not alike: the test can tell them apart


@pytest.mark.parametrize("which,method", [("xs", "greedy_search"),
                                          ("xs", "modified_beam_search"),
                                          ("demo", "greedy_search")])
def test_sherpa_online_recognizer_decodes_like_pytorch(which: str, method: str, request
                                                       ) -> None:
    """sherpa-onnx 2.0.1's OnlineRecognizer, audio fed in 0.1 s pieces with T frames of
    silence appended: token for token PyTorch's chunk-wise decoding of the same frames, and
    exactly the chunks the rule "decoded once num_frames > 2ck + T" gives. Greedy streams
    decode one after the other, beam search streams together in batches (decode_streams)."""
    model, out = request.getfixturevalue(which)
    chunk = model.encoder.chunk_size[0]
    tail = tail_seconds(chunk)
    waves = tones(WAVES)
    rec = recognizer(out, method, beam=4, online=True)
    results, chunks = sherpa_stream_decode(rec, waves, tail,
                                           together=method == "modified_beam_search")
    got = [result_ids(r, out / "tokens.txt") for r in results]
    want, want_chunks = zip(*(pytorch_streaming(model, w, tail, method) for w in waves),
                            strict=True)
    assert chunks == list(want_chunks)
    # with T frames of silence, every frame of the audio is in a decoded chunk's 2 * chunk
    # new frames
    assert all(2 * chunk * n >= (w.size + 80) // 160 for w, n in zip(waves, chunks, strict=True))
    assert min(len(w) for w in want) >= 5  # non-trivial hypotheses
    assert got == list(want)
    assert results[0].text == " ".join(f"T{i}" for i in got[0])


def test_sherpa_decodes_a_chunk_only_past_its_last_frame(xs) -> None:
    """Which frames sherpa-onnx decodes, at the boundaries: chunk k needs num_frames >
    2ck + T (not >=: one frame more than the chunk reads); frames after the last full chunk
    are dropped, even after input_finished(). num_frames = (samples + 80) // 160 (Kaldi
    fbank, snip_edges false)."""
    _, out = xs
    rec = recognizer(out, "greedy_search", online=True)
    noise = np.random.default_rng(0).standard_normal(16000).astype(np.float32) * 0.1
    T = 45
    for num_frames, want in ((T, 0), (T + 1, 1), (T + 32, 1), (T + 33, 2), (T + 64, 2)):
        samples = 160 * num_frames - 80  # the fewest samples giving num_frames frames
        for n in (samples - 1, samples):
            _, (chunks,) = sherpa_stream_decode(rec, [noise[:n]], 0.0)
            assert chunks == (want if n == samples else sherpa_chunks(num_frames - 1, 16))
            assert chunks == sherpa_chunks((n + 80) // 160, 16)


def test_int8_decodes_mostly_like_fp32(xs) -> None:
    """The int8 models load and decode in sherpa-onnx; their hypotheses are close to fp32's:
    token error rate of int8 against fp32 at most 20 % (measured: see docs/deploy.md)."""
    from zipasr.decode.scoring import error_stats

    _, out = xs
    waves, tail = tones(WAVES), tail_seconds(16)
    fp32, _ = sherpa_stream_decode(recognizer(out, "greedy_search", online=True), waves, tail)
    int8, _ = sherpa_stream_decode(recognizer(out, "greedy_search", int8=True, online=True),
                                   waves, tail)
    ref = [result_ids(r, out / "tokens.txt") for r in fp32]
    hyp = [result_ids(r, out / "tokens.txt") for r in int8]
    stats = error_stats([(str(i), list(map(str, r)), list(map(str, h)))
                         for i, (r, h) in enumerate(zip(ref, hyp, strict=True))])
    same = sum(r == h for r, h in zip(ref, hyp, strict=True))
    print(f"int8 vs fp32 (greedy): token error rate {stats.wer:.1f} %, {same}/{len(ref)} "
          f"identical")
    assert all(0 < i < VOCAB for h in hyp for i in h)
    assert stats.wer <= 20.0


def docs_snippet() -> str:
    text = (ROOT / "docs" / "deploy.md").read_text()
    section = text.split("\n## Streaming (causal models)\n", 1)[1].split("\n## ", 1)[0]
    m = re.search(r"```python\n(.*?)```", section, re.S)
    assert m, "no Python snippet in docs/deploy.md's Streaming section"
    return m.group(1)


def test_docs_snippet_runs_as_written(xs, tmp_path: Path) -> None:
    """The Streaming section's snippet, unchanged, in a directory laid out as it expects (the
    chunk-16 export at the path it names, a FLAC file at the path it names): it prints what
    PyTorch's chunk-wise greedy search decodes from that file."""
    import soundfile as sf

    model, out = xs
    code = docs_snippet()
    (onnx_dir,) = re.findall(r'onnx = "([^"]+)"', code)
    (audio,) = re.findall(r'"([^"]+\.flac)"', code)
    (tmp_path / onnx_dir).parent.mkdir(parents=True)
    (tmp_path / onnx_dir).symlink_to(out)
    write_tone(tmp_path / audio, 2.3, seed=4, fmt="FLAC")
    samples, sr = sf.read(tmp_path / audio, dtype="float32")
    tokens, _ = pytorch_streaming(model, samples, tail_seconds(16), "greedy_search")
    assert len(tokens) >= 5
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                          text=True, env=tool_env(), timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == " ".join(f"T{i}" for i in tokens)


def test_refusals_name_the_reason(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A non-causal model with --streaming (through the `zipasr` executable), a causal one
    without it, chunk sizes and left contexts that do not fit, and models sherpa-onnx's
    streaming Zipformer cannot hold: exit status 2, a message naming the reason, nothing
    written."""
    from zipasr.cli import main

    tokens = write_numbered_tokens(tmp_path / "tokens.txt", VOCAB)
    out = tmp_path / "onnx"

    def checkpoint(name: str, **config) -> Path:
        torch.manual_seed(0)
        model = Transducer.from_preset("xs", vocab_size=VOCAB, **config)
        path = tmp_path / f"{name}.pt"
        torch.save({"model": model.state_dict(), "model_config": model.config.to_dict()}, path)
        return path

    argv = ["export-onnx", "--tokens", str(tokens), "--out-dir", str(out), "--no-int8"]
    proc = subprocess.run([str(Path(sys.executable).parent / "zipasr"), *argv, "--streaming",
                           "--model", str(checkpoint("offline"))], capture_output=True,
                          text=True, env=tool_env(), cwd=ROOT, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "error: --streaming needs a causal model" in proc.stderr
    assert "export it without --streaming" in proc.stderr

    causal = checkpoint("causal", causal=True)
    for extra, message in [
        ([], "the model is causal (a streaming model): use --streaming"),
        (["--streaming", "--chunk-size", "12"], "--chunk-size 12 --left-context-frames 128: "
         "chunk size 12: must be a positive multiple of every downsampling factor"),
        (["--streaming", "--chunk-size", "0"], "chunk size 0: must be a positive multiple"),
        (["--streaming", "--left-context-frames", "40"],
         "left context 40 frames: must be a positive multiple of the chunk size 16"),
        (["--streaming", "--chunk-size", "32", "--left-context-frames", "0"],
         "left context 0 frames: must be a positive multiple of the chunk size 32"),
        (["--streaming", "--chunk-size", "8", "--left-context-frames", "8"],
         "left context 8 frames is shorter than the convolutions' left context (16 frames"),
    ]:
        assert main([*argv, "--model", str(causal), *extra]) == 2, extra
        err = capsys.readouterr().err
        assert "zipasr export-onnx: error: " in err and message in err, (extra, err)
    for config, message in (({"embed_channels": (8, 32, 192)}, "holds at most 128"),
                            ({"feature_dim": 64}, "takes 80-bin fbank")):
        torch.manual_seed(0)
        model = Transducer.from_preset("xs", vocab_size=VOCAB, causal=True, **config)
        with pytest.raises(ZipasrError, match=message):
            export_onnx_streaming(model, out, tokens=tokens)
    assert not out.exists()
