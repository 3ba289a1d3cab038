"""`zipasr export-onnx`: the exported files meet sherpa-onnx's contract (docs/deploy.md), run in
onnxruntime as the PyTorch model does, and sherpa-onnx itself decodes with them exactly as
zipasr's own search does; the README's Python snippet runs as written; an export killed at any
point leaves no output directory.

The models are untrained (random weights): their outputs are long, arbitrary token sequences,
which makes the comparisons with PyTorch strict (an empty transcript agrees with anything).
The trained smoke model of the DAG is compared in tests/test_dag.py.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import ROOT, tool_env, write_tone
from onnx_helpers import recognizer, result_ids, sherpa_decode

from zipasr.deploy.onnx_export import (
    FP32_FILES,
    INT8_FILES,
    PAD_VALUE,
    ExportReport,
    export_onnx,
    ort_session,
    read_metadata,
)
from zipasr.errors import ZipasrError
from zipasr.model import Transducer

pytest.importorskip("sherpa_onnx")

VOCAB = 40  # the xs preset's, and the test BPE model's
RTOL = 1e-4  # ONNX Runtime vs PyTorch: largest difference over the largest value


def random_model(preset: str = "xs", vocab: int = VOCAB, seed: int = 0) -> Transducer:
    torch.manual_seed(seed)
    model = Transducer.from_preset(preset, vocab_size=vocab).eval()
    with torch.no_grad():
        # Like a trained model, never emit <sos/eos> (1) or <unk> (2): sherpa-onnx takes <unk>
        # for blank, while zipasr's search would emit it.
        model.joiner.output_linear.bias[1:3] = -30.0
    return model


def encoder_torch(model: Transducer, x: torch.Tensor, x_lens: torch.Tensor
                  ) -> tuple[np.ndarray, list[int]]:
    """What encoder.onnx computes, from the PyTorch model: encoder output through encoder_proj."""
    with torch.no_grad():
        out, lens = model.forward_encoder(x, x_lens)
        return model.joiner.encoder_proj(out).numpy(), lens.tolist()


def rel(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got - want).max() / np.abs(want).max())


def tones(seconds: tuple[float, ...] = (1.3, 2.0, 0.7, 2.6)) -> list[np.ndarray]:
    """Deterministic speech-like waves (vibrato harmonics + noise), 16 kHz float32."""
    rng = np.random.default_rng(0)
    waves = []
    for sec in seconds:
        t = np.arange(int(sec * 16000)) / 16000
        f0 = 100 + 80 * rng.random()
        x = sum(np.sin(2 * np.pi * f0 * k * t * (1 + 0.1 * np.sin(4.4 * t))) / k
                for k in range(1, 6))
        waves.append((0.3 * x / np.abs(x).max() + 0.01 * rng.standard_normal(t.size))
                     .astype(np.float32))
    return waves


def pytorch_search(model: Transducer, waves: list[np.ndarray], method: str) -> list[list[int]]:
    """zipasr's own decoding of the waves in one padded batch: lhotse Fbank (the training
    features), forward_encoder, zipasr.decode.search."""
    from lhotse import Fbank, FbankConfig

    from zipasr.decode.features import collate_features
    from zipasr.decode.search import search

    fbank = Fbank(FbankConfig(num_mel_bins=80, frame_shift=0.01, dither=0.0))
    x, x_lens = collate_features([torch.from_numpy(fbank.extract(w, 16000)) for w in waves])
    with torch.no_grad():
        out, lens = model.forward_encoder(x, x_lens)
        return [h.tokens for h in search(model, out, lens, method, beam=4)]


@pytest.fixture(scope="module")
def bpe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from zipasr.lang.bpe import train_bpe

    root = tmp_path_factory.mktemp("bpe")
    words = [w.strip().upper() for w in (ROOT / "src/zipasr/data/synth/text/nouns.txt")
             .read_text().splitlines() if w.strip() and not w.startswith("#")]
    lines = [" ".join(words[(7 * i + k) % len(words)] for k in range(6)) for i in range(300)]
    (root / "text.txt").write_text("\n".join(lines) + "\n")
    return train_bpe(root / "text.txt", root / "lang", VOCAB)


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory, bpe: Path
             ) -> tuple[Transducer, Path, ExportReport]:
    model = random_model()
    out = tmp_path_factory.mktemp("export") / "onnx"
    report = export_onnx(model, out, bpe_model=bpe)
    return model, out, report


def _io(path: Path) -> tuple[list[tuple[str, str, list]], list[tuple[str, str, list]]]:
    """(inputs, outputs) of a graph as (name, element type, shape with symbolic dims)."""
    import onnx

    graph = onnx.load(str(path)).graph

    def desc(v: onnx.ValueInfoProto) -> tuple[str, str, list]:
        t = v.type.tensor_type
        return (v.name, onnx.TensorProto.DataType.Name(t.elem_type),
                [d.dim_param or d.dim_value for d in t.shape.dim])

    inits = {i.name for i in graph.initializer}
    return ([desc(v) for v in graph.input if v.name not in inits],
            [desc(v) for v in graph.output])


@pytest.mark.filterwarnings("ignore:`torch.jit.trace` is deprecated:DeprecationWarning")
def test_rel_shift_export_path_is_the_strided_one() -> None:
    """The export path of the relative-position shift (a gather, taken while tracing) picks the
    same elements as the training path's as_strided, bit for bit, for self-attention
    (key_len = T) and streaming (key_len = cache + T); traced at one length, it follows
    another."""
    from zipasr.model.attention import rel_to_abs, rel_to_abs_gather

    g = torch.Generator().manual_seed(0)
    for T, key_len in ((1, 1), (5, 5), (23, 23), (4, 20), (16, 80)):
        scores = torch.randn(3, 2, T, key_len + T - 1, generator=g)
        assert torch.equal(rel_to_abs_gather(scores, key_len), rel_to_abs(scores, key_len))

    def shift(scores: torch.Tensor) -> torch.Tensor:
        return rel_to_abs(scores, scores.shape[2])

    traced = torch.jit.trace(shift, torch.randn(3, 2, 7, 13))
    scores = torch.randn(3, 2, 11, 21, generator=g)
    assert torch.equal(traced(scores), rel_to_abs(scores, 11))


def test_graphs_metadata_and_int8_follow_the_contract(exported) -> None:
    import onnx

    model, out, report = exported
    assert sorted(report.files) == sorted([*FP32_FILES, *INT8_FILES, "tokens.txt"])
    assert sorted(p.name for p in out.iterdir()) == sorted(report.files)
    assert all(v <= RTOL for v in report.rel_diff.values()), report.rel_diff
    j = model.config.joiner_dim
    for suffix in ("", ".int8"):
        # sherpa-onnx passes tensors by position: the order is part of the contract
        ins, outs = _io(out / f"encoder{suffix}.onnx")
        assert [(n, t) for n, t, _ in ins] == [("x", "FLOAT"), ("x_lens", "INT64")]
        assert ins[0][2][2] == 80 and all(isinstance(d, str) for d in ins[0][2][:2])
        assert [(n, t) for n, t, _ in outs] == [("encoder_out", "FLOAT"),
                                                 ("encoder_out_lens", "INT64")]
        assert outs[0][2][2] == j and all(isinstance(d, str) for d in outs[0][2][:2])
        ins, outs = _io(out / f"decoder{suffix}.onnx")
        assert ins == [("y", "INT64", ["N", 2])] and outs == [("decoder_out", "FLOAT", ["N", j])]
        ins, outs = _io(out / f"joiner{suffix}.onnx")
        assert ins == [("encoder_out", "FLOAT", ["N", j]), ("decoder_out", "FLOAT", ["N", j])]
        assert outs == [("logit", "FLOAT", ["N", VOCAB])]

        enc = read_metadata(out / f"encoder{suffix}.onnx")
        assert enc["model_type"] == "zipformer2" and enc["version"] == "1"
        assert enc["model_author"] and enc["comment"]
        dec = read_metadata(out / f"decoder{suffix}.onnx")
        assert (dec["vocab_size"], dec["context_size"]) == (str(VOCAB), "2")
    assert {o.version for o in onnx.load(str(out / "encoder.onnx")).opset_import
            if o.domain in ("", "ai.onnx")} == {13}
    # the int8 files are quantized: integer matrix products with int8 weights
    for name in ("encoder", "joiner"):
        ops = {n.op_type for n in onnx.load(str(out / f"{name}.int8.onnx")).graph.node}
        assert "MatMulInteger" in ops and "DynamicQuantizeLinear" in ops, (name, ops)


def test_tokens_list_every_id_the_joiner_emits(exported, bpe: Path) -> None:
    import sentencepiece as spm

    model, out, _ = exported
    lines = (out / "tokens.txt").read_text().splitlines()
    table = [line.rsplit(" ", 1) for line in lines]
    zeros = np.zeros((1, model.config.joiner_dim), np.float32)
    (logit,) = ort_session(out / "joiner.onnx").run(
        None, {"encoder_out": zeros, "decoder_out": zeros})
    assert [int(i) for _, i in table] == list(range(logit.shape[1]))  # each id once, in order
    assert lines[:3] == ["<blk> 0", "<sos/eos> 1", "<unk> 2"]  # icefall's BPE layout
    sp = spm.SentencePieceProcessor(model_file=str(bpe))
    assert [p for p, _ in table] == [sp.id_to_piece(i) for i in range(sp.get_piece_size())]


def test_decoder_start_context_embeds_minus_one_as_zeros(exported) -> None:
    model, out, _ = exported
    y = np.array([[-1, 0], [0, 0], [-1, 7], [5, 9]], dtype=np.int64)
    (got,) = ort_session(out / "decoder.onnx").run(None, {"y": y})
    dec = model.decoder
    with torch.no_grad():
        want = model.joiner.decoder_proj(dec(torch.from_numpy(y), need_pad=False).squeeze(1))
        # the contract's semantics, spelled out: a -1 context slot is a zero embedding
        emb = dec.embedding(torch.tensor([0, 7]))
        slots = torch.stack([torch.zeros_like(emb), emb], dim=2)  # (2, D, context)
        manual = model.joiner.decoder_proj(torch.relu(dec.conv(slots)).squeeze(-1))
    assert rel(got, want.numpy()) <= RTOL
    assert rel(got[[0, 2]], manual.numpy()) <= RTOL
    assert np.abs(got[0] - got[1]).max() > 1e-3  # -1 is not read as id 0 (the blank)


def test_encoder_matches_pytorch_on_a_ragged_batch(exported) -> None:
    """Two utterances of different lengths, the shorter padded with log(1e-10) as sherpa-onnx
    pads: ONNX Runtime reproduces PyTorch on both, and handles the padding exactly as the
    model does (mask from x_lens)."""
    model, out, _ = exported
    enc = ort_session(out / "encoder.onnx")
    long, short = 231, 158
    x = torch.randn(2, long, 80, generator=torch.Generator().manual_seed(3))
    x[1, short:] = math.log(1e-10)
    assert abs(math.log(1e-10) - PAD_VALUE) < 1e-12
    x_lens = torch.tensor([long, short])
    want, want_lens = encoder_torch(model, x, x_lens)
    got, got_lens = enc.run(None, {"x": x.numpy(), "x_lens": x_lens.numpy()})
    assert got_lens.tolist() == want_lens == [((t - 7) // 2 + 1) // 2 for t in (long, short)]
    for i, n in enumerate(want_lens):
        assert rel(got[i, :n], want[i, :n]) <= RTOL, i

    # the shorter one alone, unpadded
    alone, _ = enc.run(None, {"x": x[1:, :short].numpy(), "x_lens": x_lens[1:].numpy()})
    want_alone, _ = encoder_torch(model, x[1:, :short], x_lens[1:])
    n = want_lens[1]
    assert rel(alone[0], want_alone[0]) <= RTOL
    # Padded vs alone: the Zipformer is not exactly padding-invariant (icefall's too): the
    # ConvNeXt's 7-frame kernel and the downsampling stacks' last partial group see padded
    # frames. The exported graph must differ exactly as the model does, no more.
    model_effect = want[1, :n] - want_alone[0]
    onnx_effect = got[1, :n] - alone[0]
    assert np.abs(onnx_effect - model_effect).max() <= RTOL * np.abs(want_alone).max()
    print(f"encoder: padded vs alone differ by {rel(want[1, :n], want_alone[0]):.2e} "
          f"(relative) in PyTorch, by {rel(got[1, :n], alone[0]):.2e} in ONNX Runtime")
    # x_lens is read: the same batch with the padding declared as speech gives another output
    unmasked, _ = enc.run(None, {"x": x.numpy(), "x_lens": np.array([long, long])})
    assert rel(unmasked[1, :n], got[1, :n]) > 100 * RTOL


def test_sherpa_onnx_decodes_like_zipasr(exported) -> None:
    """sherpa-onnx 2.0.1 on the exported files, one padded batch, greedy and modified beam
    search (4 active paths): token for token what zipasr's search gives on the training
    features of the same audio. The int8 models load and decode into listed tokens."""
    model, out, _ = exported
    waves = tones()
    for method in ("greedy_search", "modified_beam_search"):
        want = pytorch_search(model, waves, method)
        assert min(len(w) for w in want) >= 3  # non-trivial hypotheses
        got = [result_ids(r, out / "tokens.txt")
               for r in sherpa_decode(recognizer(out, method, beam=4), waves)]
        assert got == want, method
        int8 = sherpa_decode(recognizer(out, method, beam=4, int8=True), waves)
        assert all(isinstance(r.text, str) for r in int8)
        assert all(0 < i < VOCAB for r in int8 for i in result_ids(r, out / "tokens.txt"))


def readme_snippet() -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Use the model\n", 1)[1].split("\n## ", 1)[0]
    m = re.search(r"```python\n(.*?)```", section, re.S)
    assert m, "no Python snippet in the README's 'Use the model' section"
    return m.group(1)


def test_readme_snippet_runs_as_written(exported, bpe: Path, tmp_path: Path) -> None:
    """The snippet, unchanged, in a directory laid out as after `make run` (the export at the
    path it names, an audio file at the path it names): it prints what zipasr's own beam search
    transcribes from that file."""
    import sentencepiece as spm
    import soundfile as sf

    model, out, _ = exported
    code = readme_snippet()
    (onnx_dir,) = set(re.findall(r'"([^"]+/onnx)"', code))
    (audio,) = set(re.findall(r'"([^"]+\.(?:flac|wav))"', code))
    (tmp_path / onnx_dir).parent.mkdir(parents=True)
    (tmp_path / onnx_dir).symlink_to(out)
    write_tone(tmp_path / audio, 2.3, seed=4, fmt="FLAC")
    samples, sr = sf.read(tmp_path / audio, dtype="float32")
    assert sr == 16000
    method = "modified_beam_search" if "modified_beam_search" in code else "greedy_search"
    sp = spm.SentencePieceProcessor(model_file=str(bpe))
    expected = sp.decode(pytorch_search(model, [samples], method)[0])
    assert expected.strip()

    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                          text=True, env=tool_env(), timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == expected.strip()


def test_untrained_s_model_exports_and_sherpa_onnx_decodes(tmp_path: Path) -> None:
    """icefall's Zipformer-S shape (random weights, vocab 500) through the same export as the
    small models: M and L differ only in sizes, not in code path. No int8 here, for time."""
    model = random_model("S", vocab=500)
    tokens = tmp_path / "tokens.txt"
    tokens.write_text("\n".join(["<blk> 0", "<sos/eos> 1", "<unk> 2"]
                                + [f"▁T{i} {i}" for i in range(3, 500)]) + "\n")
    report = export_onnx(model, tmp_path / "onnx", tokens=tokens, int8=False)
    assert all(v <= RTOL for v in report.rel_diff.values()), report.rel_diff
    (result,) = sherpa_decode(recognizer(tmp_path / "onnx", "greedy_search"), tones((1.5,)))
    ids = result_ids(result, tmp_path / "onnx" / "tokens.txt")
    assert ids and all(3 <= i < 500 for i in ids)
    assert result.text == " ".join(f"T{i}" for i in ids)


def test_cli_export_killed_leaves_no_directory(exported, bpe: Path, tmp_path: Path) -> None:
    """`zipasr export-onnx` on an averaged-model file, SIGKILLed while writing tokens.txt and
    just before the finished directory's rename: no output directory either time; then a
    clean run writes the complete directory and removes the killed runs' temporaries. A
    tokens table the joiner's ids do not fit is refused before anything is written."""
    from zipasr.cli import main

    model, _, _ = exported
    ckpt = tmp_path / "epoch-2_avg-1.pt"
    torch.save({"model": model.state_dict(), "model_config": model.config.to_dict()}, ckpt)
    out = tmp_path / "exp" / "onnx"
    argv = ["export-onnx", "--model", str(ckpt), "--bpe-model", str(bpe), "--out-dir",
            str(out), "--no-int8"]
    env = tool_env()
    for spec in ({"write": "tokens.txt", "after": 10}, {"replace": "onnx"}):
        proc = subprocess.run([sys.executable, str(ROOT / "tests" / "kill_at.py"),
                               json.dumps(spec), *argv], capture_output=True, text=True,
                              env=env, timeout=300)
        assert proc.returncode == -9, (spec, proc.stderr[-2000:])
        assert not out.exists(), spec
        assert [p for p in out.parent.iterdir() if ".partial" in p.name], spec

    assert main(argv) == 0  # the same command, in this process (saves starting torch again)
    assert sorted(p.name for p in out.iterdir()) == sorted([*FP32_FILES, "tokens.txt"])
    assert [p.name for p in out.parent.iterdir()] == ["onnx"]
    (tmp_path / "plain").mkdir()  # as readable as a plain directory, not a private temporary
    assert out.stat().st_mode == (tmp_path / "plain").stat().st_mode

    bad = tmp_path / "tokens.txt"
    bad.write_text("".join(f"x{i} {i}\n" for i in range(VOCAB - 1)))  # one id short
    with pytest.raises(ZipasrError, match="each must be listed"):
        export_onnx(model, tmp_path / "bad", tokens=bad)
    assert not (tmp_path / "bad").exists()
    assert main([*argv[:3], "--tokens", str(bad), *argv[5:]]) == 2  # vocab size mismatch
