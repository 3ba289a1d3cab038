"""``zipasr transcribe`` end to end with a random xs model made peaky enough to emit tokens:
training features, agreement with ``zipasr decode``, resampling and down-mixing, MP3,
timestamps against a hand-run greedy search, per-file errors, icefall's pretrained.pt."""

from __future__ import annotations

import json
import random
import subprocess
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from helpers import BIN, babble, peaky_xs_model, tool_env, write_manifests

from zipasr.cli import main
from zipasr.data.fbank import fbank_extractor
from zipasr.decode.scoring import read_recogs
from zipasr.deploy.transcribe import (
    Item,
    Transcriber,
    batches,
    compute_features,
    load_audio,
    load_transcriber,
)

torch.set_num_threads(1)

WORDS = "ALPHA BRAVO CHARLIE DELTA ECHO FOXTROT GOLF HOTEL INDIA JULIET KILO LIMA".split()
N_FILES = 4
VOCAB = 30


def _smooth(sr: int, seconds: float = 1.5) -> np.ndarray:
    """A signal band-limited to < 1.6 kHz given in closed form, so it can be sampled at any
    rate: 7 harmonics of a gliding 90-210 Hz fundamental with slowly varying amplitudes."""
    t = np.arange(int(seconds * sr)) / sr
    phase = 2 * np.pi * (150 * t - 60 / (2 * np.pi * 0.7) * np.cos(2 * np.pi * 0.7 * t))
    x = sum((0.5 + 0.5 * np.sin(2 * np.pi * 0.3 * k * t + k)) * np.sin(k * phase) / k
            for k in range(1, 8))
    return (0.2 * x).astype(np.float32)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict:
    from lhotse import CutSet, RecordingSet, SupervisionSet

    from zipasr.data.fbank import FbankOptions, compute_fbank
    from zipasr.lang.bpe import train_bpe

    tmp = tmp_path_factory.mktemp("transcribe")
    rng = random.Random(0)
    audio = []
    for i in range(N_FILES):
        path = tmp / "audio" / f"utt{i}.wav"
        path.parent.mkdir(exist_ok=True)
        sf.write(str(path), babble(0.9 + 0.35 * i, seed=i), 16000, subtype="PCM_16")
        audio.append(path)
    texts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 5)))
             for _ in range(N_FILES)]
    r, s = write_manifests(audio, texts, tmp)
    # what `zipasr fbank` stores (lilcom) ...
    stored = tmp / "fbank" / "x_cuts_test.jsonl.gz"
    compute_fbank(r, s, stored, tmp / "fbank" / "x_feats_test", FbankOptions(), progress=False)
    # ... and cuts without features, which `zipasr decode` computes on the fly
    raw = tmp / "raw" / "x_cuts_test.jsonl.gz"
    raw.parent.mkdir()
    raw_cuts = CutSet.from_manifests(recordings=RecordingSet.from_file(r),
                                     supervisions=SupervisionSet.from_file(s))
    CutSet.from_cuts(c.with_id(c.supervisions[0].id) for c in raw_cuts).to_file(raw)

    text = tmp / "text.txt"
    text.write_text("\n".join(" ".join(rng.choice(WORDS) for _ in range(6))
                              for _ in range(200)) + "\n")
    bpe = train_bpe(text, tmp / "lang_bpe_30", VOCAB)

    model = peaky_xs_model([torch.from_numpy(c.load_features())
                            for c in CutSet.from_file(stored)], VOCAB)
    sd = model.state_dict()
    ckpt = tmp / "epoch-1.pt"
    torch.save({"model": sd, "model_config": model.config.to_dict()}, ckpt)
    pretrained = tmp / "pretrained.pt"
    torch.save({"model": sd}, pretrained)  # icefall's layout: no config
    return {"tmp": tmp, "audio": audio, "stored": stored, "raw": raw, "bpe": bpe, "ckpt": ckpt,
            "pretrained": pretrained}


def _run(setup: dict, capsys: pytest.CaptureFixture, *argv: object,
         model: Path | None = None) -> tuple[int, str, str]:
    """``zipasr transcribe`` in this process: (exit status, stdout, stderr)."""
    capsys.readouterr()
    rc = main(["transcribe", "--model", str(model or setup["ckpt"]), "--bpe-model",
               str(setup["bpe"]), "--device", "cpu", *map(str, argv)])
    out, err = capsys.readouterr()
    return rc, out, err


def _lines(out: str) -> list[tuple[str, str]]:
    return [tuple(line.split("\t", 1)) for line in out.splitlines()]  # type: ignore[misc]


def _hand_greedy(model, enc: torch.Tensor) -> tuple[list[int], list[int]]:
    """Greedy search one frame at a time, without the batched search's caches and sorting:
    enc (T, C) -> (tokens, emitting frame of each)."""
    blank, c = model.decoder.blank_id, model.decoder.context_size
    ys, frames = [-1] * (c - 1) + [blank], []
    for t in range(enc.shape[0]):
        dec = model.decoder(torch.tensor([ys[-c:]]), need_pad=False)  # (1, 1, D)
        tok = int(model.joiner(enc[t].view(1, 1, -1), dec).argmax())
        if tok != blank:
            ys.append(tok)
            frames.append(t)
    return ys[c:], frames


def test_features_are_the_training_features(setup: dict) -> None:
    """A 16 kHz mono file gets exactly the features of the data stage's extractor call on
    the same recording, and `zipasr fbank`'s stored ones up to lilcom's rounding (values
    stored as multiples of 2^-5: |error| <= 2^-6)."""
    from lhotse import CutSet, Fbank, FbankConfig

    from zipasr.data.fbank import FbankOptions

    o = FbankOptions()
    # the call zipasr fbank's worker makes, spelled out here independently of transcribe.py
    reference = Fbank(FbankConfig(num_mel_bins=o.num_mel_bins, frame_shift=o.frame_shift,
                                  dither=o.dither))
    ex = fbank_extractor(80)
    stored = {c.recording_id: c for c in CutSet.from_file(setup["stored"])}
    for cut in CutSet.from_file(setup["raw"]):
        path = cut.recording.sources[0].source
        mine = compute_features(ex, load_audio(path))
        assert torch.equal(mine, torch.from_numpy(cut.compute_features(reference)))
        lilcom = torch.from_numpy(stored[cut.recording_id].load_features())
        assert mine.shape == lilcom.shape
        assert float((mine - lilcom).abs().max()) <= 2.0 ** -6 + 1e-6


def test_resampled_stereo_and_mp3(tmp_path: Path) -> None:
    """An 8 kHz stereo file whose channels average to a band-limited signal is resampled and
    down-mixed to that signal sampled at 16 kHz (the interior within -50 dB of the peak,
    measured -62 dB; a wrong down-mix is off by -15 dB; the resampler's edges are
    zero-padded), and its features match the 16 kHz mono file's where the signal
    has energy. A 44.1 kHz stereo MP3 (libsndfile >= 1.1 writes and reads it) decodes
    without delay to within its coding noise."""
    mono = tmp_path / "mono16k.wav"
    stereo = tmp_path / "stereo8k.wav"
    sf.write(str(mono), _smooth(16000), 16000, subtype="FLOAT")
    s8 = _smooth(8000)
    d8 = (0.05 * np.sin(2 * np.pi * 300 * np.arange(s8.size) / 8000)).astype(np.float32)
    sf.write(str(stereo), np.stack([s8 + d8, s8 - d8], axis=1), 8000, subtype="FLOAT")
    ref, got = load_audio(mono), load_audio(stereo)
    assert ref.shape == got.shape == (1, 24000)
    interior = slice(400, -400)  # 25 ms from each end
    amp = float(np.abs(ref).max())
    assert float(np.abs(ref[0, interior] - got[0, interior]).max()) < 3e-3 * amp
    ex = fbank_extractor(80)
    f_ref, f_got = compute_features(ex, ref), compute_features(ex, got)
    assert f_ref.shape == f_got.shape == (150, 80)
    # bins with energy (within e^10 of the loudest), away from the 3 edge frames on each side
    voiced = f_ref[3:-3] > f_ref.max() - 10
    assert voiced.float().mean() > 0.2
    assert float((f_ref[3:-3] - f_got[3:-3]).abs()[voiced].max()) < 0.01

    mp3 = tmp_path / "stereo44k.mp3"
    s44 = _smooth(44100)
    sf.write(str(mp3), np.stack([s44, s44], axis=1), 44100, format="MP3")
    got = load_audio(mp3)
    assert got.shape == ref.shape
    err = ref[0, interior] - got[0, interior]
    assert np.sqrt(np.mean(err ** 2)) < 0.03 * np.sqrt(np.mean(ref[0, interior] ** 2))


@pytest.mark.parametrize("method", ["greedy_search", "modified_beam_search"])
def test_same_as_decode(setup: dict, capsys: pytest.CaptureFixture, tmp_path: Path,
                        method: str) -> None:
    """One file at a time (the default) transcribe says what `zipasr decode` says for the
    same audio decoded one cut per batch; batched (--max-duration) it agrees with decode's
    batches of the same files."""
    paths = [str(p) for p in setup["audio"]]
    for max_dur, decode_max_dur in (("0", "0.01"), ("100", "100")):
        rc, out, err = _run(setup, capsys, "--method", method, "--max-duration", max_dur,
                            *paths)
        assert rc == 0, err
        got = _lines(out)
        assert [p for p, _ in got] == paths
        res = tmp_path / f"res-{max_dur}"
        assert main(["decode", "--model", str(setup["ckpt"]), "--bpe-model", str(setup["bpe"]),
                     "--cuts", str(setup["raw"]), "--method", method, "--max-duration",
                     decode_max_dur, "--result-dir", str(res), "--device", "cpu"]) == 0
        (recogs,) = res.glob("recogs-*.txt")
        hyps = {cut_id: " ".join(hyp) for cut_id, _, hyp in read_recogs(recogs)}
        assert [text for _, text in got] == [hyps[f"utt{i}"] for i in range(N_FILES)]
    # the check has teeth: the model says different, non-empty things about different files
    assert len({text for _, text in got}) == N_FILES and all(text for _, text in got)


def test_json_timestamps(setup: dict, capsys: pytest.CaptureFixture) -> None:
    """Greedy's tokens and emitting frames equal a hand-run greedy search on the encoder
    output of independently computed features; timestamps are those frames x the model's
    output frame shift (10 ms x 4 = 40 ms), increasing and inside the audio; words start at
    their first piece. Beam 1 reports greedy's frames; beam 4's are increasing too."""
    from lhotse import CutSet, Fbank, FbankConfig

    from zipasr.decode.model import load_model

    model = load_model(setup["ckpt"])
    tr = load_transcriber(setup["ckpt"], setup["bpe"])
    assert tr.frame_shift == pytest.approx(0.04)
    paths = [str(p) for p in setup["audio"]]
    rc, out, _ = _run(setup, capsys, "--json", *paths)
    assert rc == 0
    objs = [json.loads(line) for line in out.splitlines()]
    assert [o["file"] for o in objs] == paths
    extractor = Fbank(FbankConfig(num_mel_bins=80, frame_shift=0.01, dither=0.0))
    cuts = {c.recording_id: c for c in CutSet.from_file(setup["raw"])}
    n_tokens = 0
    for i, o in enumerate(objs):
        cut = cuts[f"utt{i}"]
        x = torch.from_numpy(cut.compute_features(extractor))
        with torch.inference_mode():
            enc, enc_lens = model.forward_encoder(x[None], torch.tensor([x.shape[0]]))
            tokens, frames = _hand_greedy(model, enc[0])
        T = int(enc_lens[0])
        assert T == ((x.shape[0] - 7) // 2 + 1) // 2
        assert o["token_ids"] == tokens
        assert o["tokens"] == [tr.sp.id_to_piece(t) for t in tokens]
        assert o["text"] == " ".join(tr.sp.decode(tokens).split())
        assert o["timestamps"] == pytest.approx([f * 0.04 for f in frames], abs=1e-9)
        assert all(a < b for a, b in zip(o["timestamps"], o["timestamps"][1:], strict=False))
        assert all(0 <= s < o["duration"] for s in o["timestamps"])
        assert o["duration"] == pytest.approx(cut.duration, abs=1e-4)  # rounded to 0.1 ms
        assert [w["word"] for w in o["words"]] == o["text"].split()
        # a word starts at a "▁" piece, at an unknown piece, and right after one
        unk = [tr.sp.is_unknown(t) for t in tokens]
        firsts = [k for k, p in enumerate(o["tokens"])
                  if k == 0 or p.startswith("\u2581") or unk[k] or unk[k - 1]]
        assert [w["start"] for w in o["words"]] == [o["timestamps"][k] for k in firsts]
        n_tokens += len(tokens)
    assert n_tokens > 2 * N_FILES  # the timestamps checked are not vacuous

    _, out1, _ = _run(setup, capsys, "--json", "--method", "modified_beam_search", "--beam", "1",
                      *paths)
    assert [json.loads(line)["timestamps"] for line in out1.splitlines()] == \
        [o["timestamps"] for o in objs]
    _, out4, _ = _run(setup, capsys, "--json", "--method", "modified_beam_search", *paths)
    for o in map(json.loads, out4.splitlines()):
        ts = o["timestamps"]
        assert len(ts) == len(o["token_ids"])
        assert all(a < b for a, b in zip(ts, ts[1:], strict=False))
        assert all(0 <= s < o["duration"] for s in ts)


def test_bad_files_are_named_and_skipped(setup: dict, tmp_path: Path) -> None:
    """The real `zipasr` command: missing, empty and garbage files are each named on stderr,
    the good files around them are transcribed in order, and the exit status is 2."""
    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    garbage = tmp_path / "garbage.wav"
    garbage.write_bytes(bytes(range(256)) * 40)
    missing = tmp_path / "missing.flac"
    good = [str(p) for p in setup["audio"][:2]]
    files = [good[0], str(missing), str(empty), str(garbage), good[1]]
    proc = subprocess.run(
        [str(BIN / "zipasr"), "transcribe", "--model", str(setup["ckpt"]), "--bpe-model",
         str(setup["bpe"]), "--device", "cpu", *files],
        capture_output=True, text=True, env=tool_env())
    assert proc.returncode == 2, proc.stderr
    assert [p for p, _ in _lines(proc.stdout)] == good
    err = proc.stderr
    assert f"error: {missing}: no such file" in err
    assert f"error: {empty}: empty file (0 bytes)" in err
    assert f"error: {garbage}: cannot decode audio (" in err
    assert "3 of 5 files failed" in err


def test_too_short_file_gets_empty_transcript(setup: dict, capsys: pytest.CaptureFixture,
                                              tmp_path: Path) -> None:
    short = tmp_path / "short.wav"
    sf.write(str(short), babble(0.06, seed=9), 16000)  # 6 frames: no encoder output frame
    rc, out, err = _run(setup, capsys, short, setup["audio"][0])
    assert rc == 0
    assert _lines(out)[0] == (str(short), "")
    assert _lines(out)[1][1]  # the next file is unaffected
    assert "too short" in err


def test_icefall_pretrained(setup: dict, capsys: pytest.CaptureFixture) -> None:
    """``{"model": state_dict}`` loads with --preset xs --vocab-size and transcribes like the
    checkpoint it came from; without a configuration it is a clear error."""
    paths = [str(p) for p in setup["audio"]]
    rc, ref, _ = _run(setup, capsys, *paths)
    assert rc == 0
    rc, out, _ = _run(setup, capsys, "--preset", "xs", "--vocab-size", VOCAB, *paths,
                      model=setup["pretrained"])
    assert rc == 0 and out == ref
    rc, out, err = _run(setup, capsys, *paths, model=setup["pretrained"])
    assert rc == 2 and out == ""
    assert "has no model_config" in err


def test_batches() -> None:
    """Consecutive files, (count x longest) <= max_duration, at least one per batch."""
    def items(durs: list[float]) -> list[Item]:
        return [Item(i, f"f{i}", torch.zeros(1, 1), d) for i, d in enumerate(durs)]

    def sizes(durs: list[float], max_duration: float) -> list[list[int]]:
        return [[it.index for it in b] for b in batches(items(durs), max_duration)]

    assert sizes([1, 2, 3], 0) == [[0], [1], [2]]
    assert sizes([1, 2, 3], 100) == [[0, 1, 2]]
    assert sizes([1, 2, 1, 5, 1], 4) == [[0, 1], [2], [3], [4]]
    assert sizes([10, 1], 4) == [[0], [1]]  # a file longer than the limit goes alone


def test_unknown_method_rejected(setup: dict) -> None:
    from zipasr.errors import ZipasrError

    tr = load_transcriber(setup["ckpt"], setup["bpe"])
    with pytest.raises(ZipasrError, match="unknown decoding method"):
        Transcriber(tr.model, tr.sp, method="ctc_greedy")


def test_lm_lodr_and_hotwords_through_both_clis(setup: dict, capsys: pytest.CaptureFixture,
                                                tmp_path: Path) -> None:
    """`transcribe` and `decode` build the same LODR + hotwords search from the same options
    (one file per batch both); options a method does not use and a bad hotwords line are
    errors naming what is wrong."""
    import sentencepiece as spm

    from zipasr.lm.bigram import estimate_kn, write_arpa
    from zipasr.lm.model import RnnLm, RnnLmConfig

    sp = spm.SentencePieceProcessor(model_file=str(setup["bpe"]))
    torch.manual_seed(0)
    lm = RnnLm(RnnLmConfig(vocab_size=VOCAB, embedding_dim=8, hidden_dim=8, num_layers=1))
    torch.save({"model": lm.state_dict(), "lm_config": lm.config.to_dict()}, tmp_path / "lm.pt")
    sentences = [sp.encode(" ".join(WORDS[i:i + 3])) for i in range(len(WORDS) - 2)]
    write_arpa(estimate_kn(sentences, [sp.id_to_piece(i) for i in range(VOCAB)]),
               tmp_path / "bigram.arpa")
    (tmp_path / "hot.txt").write_text(f"{WORDS[0]} {WORDS[1]} :3\n{WORDS[2]}\n")
    opts = ["--method", "modified_beam_search_LODR", "--lm", tmp_path / "lm.pt", "--lm-scale",
            "0.5", "--bigram", tmp_path / "bigram.arpa", "--lodr-scale", "-0.3",
            "--hotwords-file", tmp_path / "hot.txt"]
    paths = [str(p) for p in setup["audio"]]
    rc, out, err = _run(setup, capsys, *opts, *paths)
    assert rc == 0, err
    res = tmp_path / "res"
    assert main(["decode", "--model", str(setup["ckpt"]), "--bpe-model", str(setup["bpe"]),
                 "--cuts", str(setup["raw"]), "--max-duration", "0.01", "--result-dir",
                 str(res), "--device", "cpu", *map(str, opts)]) == 0
    (recogs,) = res.glob("recogs-*.txt")
    assert "_rnn-lm-scale-0.5_LODR-2gram-scale--0.3" in recogs.name
    assert "hotwords-score-1.5" in recogs.name
    hyps = {cut_id: " ".join(hyp) for cut_id, _, hyp in read_recogs(recogs)}
    assert [text for _, text in _lines(out)] == [hyps[f"utt{i}"] for i in range(N_FILES)]

    rc, _, err = _run(setup, capsys, "--lm", tmp_path / "lm.pt", *paths[:1])
    assert rc == 2 and "--lm is used by" in err
    (tmp_path / "bad.txt").write_text(f"{WORDS[0]}\n:2\n")
    rc, _, err = _run(setup, capsys, "--method", "modified_beam_search", "--hotwords-file",
                      tmp_path / "bad.txt", *paths[:1])
    assert rc == 2 and "line 2" in err
