"""``zipasr average``/``decode``/``wer-table`` end to end on tiny data: cuts with features
(lilcom, as the data stage writes them) and without (fbank on the fly), a tiny BPE, a random
xs model saved in the trainer's checkpoint format, an averaged model, and icefall's
pretrained.pt layout."""

from __future__ import annotations

import argparse
import random
import re
from pathlib import Path

import pytest
import torch
from helpers import babble, peaky_xs_model, write_manifests

from zipasr.decode.cli import register
from zipasr.decode.features import set_name_from_path
from zipasr.decode.scoring import error_stats, read_recogs
from zipasr.errors import ZipasrError

torch.set_num_threads(1)

WORDS = "ALPHA BRAVO CHARLIE DELTA ECHO FOXTROT GOLF HOTEL INDIA JULIET KILO LIMA".split()
N_CUTS = 6


def _write_babble(path: Path, seconds: float, seed: int, sr: int = 16000) -> None:
    import soundfile as sf

    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), babble(seconds, seed, sr), sr, subtype="PCM_16")


def _cli(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args([str(a) for a in argv])
    return args.func(args)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from lhotse import CutSet, RecordingSet, SupervisionSet

    from zipasr.data.fbank import FbankOptions, compute_fbank
    from zipasr.lang.bpe import train_bpe

    tmp = tmp_path_factory.mktemp("decode")
    rng = random.Random(0)
    audio = [tmp / "audio" / f"utt{i}.flac" for i in range(N_CUTS)]
    for i, path in enumerate(audio):
        _write_babble(path, 0.8 + 0.3 * i, seed=i)  # ragged lengths
    texts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 5)))
             for _ in range(N_CUTS)]
    r, s = write_manifests(audio, texts, tmp)
    feats = tmp / "fbank" / "synth_cuts_test.jsonl.gz"
    compute_fbank(r, s, feats, tmp / "fbank" / "synth_feats_test", FbankOptions(),
                  progress=False)
    raw_cuts = CutSet.from_manifests(recordings=RecordingSet.from_file(r),
                                     supervisions=SupervisionSet.from_file(s))
    raw_cuts = CutSet.from_cuts(c.with_id(c.supervisions[0].id) for c in raw_cuts)
    raw = tmp / "raw" / "synth_cuts_test.jsonl.gz"
    raw.parent.mkdir()
    raw_cuts.to_file(raw)
    # features stored losslessly: the on-the-fly path must match these exactly
    from lhotse import Fbank, FbankConfig
    from lhotse.features.io import NumpyFilesWriter

    with NumpyFilesWriter(tmp / "exact" / "feats") as writer:
        exact_cuts = CutSet.from_cuts(
            c.compute_and_store_features(Fbank(FbankConfig(num_mel_bins=80)), writer)
            for c in raw_cuts)
    exact = tmp / "exact" / "synth_cuts_test.jsonl.gz"
    exact_cuts.to_file(exact)

    text = tmp / "text.txt"
    text.write_text("\n".join(" ".join(rng.choice(WORDS) for _ in range(6))
                              for _ in range(200)) + "\n")
    bpe = train_bpe(text, tmp / "lang_bpe_30", 30)

    model = peaky_xs_model([torch.from_numpy(c.load_features())
                            for c in CutSet.from_file(feats)], 30)
    sd = model.state_dict()
    exp = tmp / "exp"
    exp.mkdir()
    for epoch in (1, 2):
        torch.save({"model": sd, "model_avg": {k: v.double() if v.is_floating_point() else v
                                               for k, v in sd.items()},
                    "model_config": model.config.to_dict(), "batch_idx_train": 10 * epoch,
                    "average_period": 5, "cur_epoch": epoch, "optimizer": {"state": {}},
                    "sampler": None}, exp / f"epoch-{epoch}.pt")
    torch.save({"model": sd}, tmp / "pretrained.pt")  # icefall's layout: no config
    causal = peaky_xs_model([torch.from_numpy(c.load_features())
                             for c in CutSet.from_file(feats)], 30, causal=True)
    torch.save({"model": causal.state_dict(), "model_config": causal.config.to_dict()},
               tmp / "causal.pt")  # an averaged model's layout
    return {"tmp": tmp, "feats": feats, "raw": raw, "exact": exact, "bpe": bpe, "exp": exp,
            "pretrained": tmp / "pretrained.pt", "causal": tmp / "causal.pt"}


def _decode(setup: dict[str, Path], out: Path, method: str, *extra: str, cuts: str = "feats",
            model: Path | None = None) -> None:
    assert _cli("decode", "--model", model or setup["exp"] / "epoch-2.pt", "--bpe-model",
                setup["bpe"], "--cuts", setup[cuts], "--method", method, "--result-dir", out,
                "--device", "cpu", *extra) == 0


def test_set_names_from_paths() -> None:
    assert set_name_from_path("data/fbank/synth_cuts_test.jsonl.gz") == "test"
    assert set_name_from_path("librispeech_cuts_test-clean.jsonl.gz") == "test-clean"
    assert set_name_from_path("x/cuts_dev.jsonl") == "dev"
    assert set_name_from_path("mine.jsonl.gz") == "mine"


def test_decode_both_methods_and_wer_table(setup: dict[str, Path], tmp_path: Path,
                                           capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "res"
    _decode(setup, out, "greedy_search")
    _decode(setup, out, "modified_beam_search", "--beam", "4")
    printed = capsys.readouterr().out
    assert re.search(r"test\tgreedy_search\tWER \d+\.\d\d% .*RTF \d", printed)
    for key in ("greedy_search", "modified_beam_search_beam-size-4"):
        recogs = read_recogs(out / f"recogs-test-{key}.txt")
        assert [r[0] for r in recogs] == [f"utt{i}" for i in range(N_CUTS)]
        assert any(hyp for _, _, hyp in recogs)  # the peaky random model says something
        st = error_stats(recogs)
        summary = (out / f"wer-summary-test-{key}.txt").read_text().splitlines()
        assert summary == ["settings\tWER", f"{key}\t{st.wer:.2f}"]
        errs = (out / f"errs-test-{key}.txt").read_text()
        assert errs.startswith(f"%WER = {st.wer:.2f}\nErrors: {st.ins} insertions, "
                               f"{st.dels} deletions, {st.subs} substitutions, over "
                               f"{st.ref_len} reference words ({st.corr} correct)\n")
        for title in ("PER-UTT DETAILS:", "SUBSTITUTIONS:", "DELETIONS:", "INSERTIONS:",
                      "PER-WORD STATS:"):
            assert f"\n{title}" in errs
    # a beam-2 decoding in the same directory: the table holds the files given, no others
    _decode(setup, out, "modified_beam_search", "--beam", "2")
    assert (out / "wer-summary-test-modified_beam_search_beam-size-2.txt").is_file()
    capsys.readouterr()
    table = tmp_path / "wer.tsv"
    summaries = [out / f"wer-summary-test-{key}.txt"
                 for key in ("greedy_search", "modified_beam_search_beam-size-4")]
    assert _cli("wer-table", *summaries, "--out", table) == 0
    lines = table.read_text().splitlines()
    assert lines[0] == "test_set\tgreedy_search\tmodified_beam_search_beam-size-4"
    assert lines[1].startswith("test\t") and len(lines) == 2
    assert capsys.readouterr().out == table.read_text()


def test_on_the_fly_features(setup: dict[str, Path], tmp_path: Path) -> None:
    """Cuts without features (fbank computed from the audio) decode exactly like cuts whose
    features were stored losslessly; lilcom-compressed features (what the data stage stores,
    |error| < ~0.05) give the same hypotheses here too (a difference would need a near tie)."""
    for name in ("feats", "exact", "raw"):
        _decode(setup, tmp_path / name, "greedy_search", cuts=name)
    recogs = {name: read_recogs(tmp_path / name / "recogs-test-greedy_search.txt")
              for name in ("feats", "exact", "raw")}
    assert len({tuple(h) for _, _, h in recogs["exact"]}) == N_CUTS  # audio-dependent output
    assert recogs["raw"] == recogs["exact"]
    assert recogs["feats"] == recogs["exact"]


def test_batching(setup: dict[str, Path], tmp_path: Path) -> None:
    """Padding uses LOG_EPSILON; without padding a batch decodes exactly like its cuts one at
    a time (the search is exact under padding too, see test_search.py). With padding the
    encoder's valid frames move slightly (icefall's Zipformer lets some padding in: Conv-Embed
    receptive field, partially padded frames of downsampled stacks), which is why the decoder
    batches cuts longest first; a run with one cut per batch still covers every cut."""
    from lhotse import CutSet

    from zipasr.decode.features import collate_features
    from zipasr.decode.model import load_model
    from zipasr.decode.search import greedy_search_batch, modified_beam_search

    model = load_model(setup["exp"] / "epoch-2.pt")
    cuts = list(CutSet.from_file(setup["feats"]))
    feats = [torch.from_numpy(c.load_features()) for c in cuts]
    x, x_lens = collate_features(feats)
    assert x.shape == (N_CUTS, max(f.shape[0] for f in feats), 80)
    i = int(x_lens.argmin())
    assert x[i, x_lens[i]:].eq(-23.025850929940457).all()
    assert torch.equal(x[i, :x_lens[i]], feats[i])
    # equal lengths, no padding: batched == one at a time
    T = min(f.shape[0] for f in feats)
    same = torch.stack([f[:T] for f in feats])
    lens = torch.full((N_CUTS,), T)
    with torch.inference_mode():
        enc, enc_lens = model.forward_encoder(same, lens)
        batched = [greedy_search_batch(model, enc, enc_lens),
                   modified_beam_search(model, enc, enc_lens)]
        for k in range(N_CUTS):
            e1, l1 = model.forward_encoder(same[k:k + 1], lens[k:k + 1])
            torch.testing.assert_close(e1[0], enc[k], rtol=1e-5, atol=1e-5)
            assert greedy_search_batch(model, e1, l1)[0].tokens == batched[0][k].tokens
            assert modified_beam_search(model, e1, l1)[0].tokens == batched[1][k].tokens
    _decode(setup, tmp_path / "one", "greedy_search", "--max-duration", "2.5")
    alone = read_recogs(tmp_path / "one" / "recogs-test-greedy_search.txt")
    assert [r[0] for r in alone] == [c.id for c in sorted(cuts, key=lambda c: c.id)]


def test_averaged_and_pretrained_models(setup: dict[str, Path], tmp_path: Path) -> None:
    avg = tmp_path / "averaged.pt"
    assert _cli("average", "--exp-dir", setup["exp"], "--epoch", "2", "--avg", "1",
                "--use-averaged-model", "--out", avg) == 0
    _decode(setup, tmp_path / "ckpt", "modified_beam_search")
    _decode(setup, tmp_path / "avg", "modified_beam_search", model=avg)
    _decode(setup, tmp_path / "pre", "modified_beam_search", "--preset", "xs",
            "--suffix", "pretrained", model=setup["pretrained"])
    key = "test-modified_beam_search_beam-size-4"
    ref = read_recogs(tmp_path / "ckpt" / f"recogs-{key}.txt")
    assert read_recogs(tmp_path / "avg" / f"recogs-{key}.txt") == ref
    assert read_recogs(tmp_path / "pre" / f"recogs-{key}-pretrained.txt") == ref
    assert (tmp_path / "pre" / f"wer-summary-{key}-pretrained.txt").is_file()


def test_errors(setup: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(ZipasrError, match="no model_config"):
        _decode(setup, tmp_path, "greedy_search", model=setup["pretrained"])
    with pytest.raises(ZipasrError, match="does not match"):
        _decode(setup, tmp_path, "greedy_search", "--preset", "demo",
                model=setup["pretrained"])
    with pytest.raises(ZipasrError, match="does not exist"):
        _cli("wer-table", tmp_path / "wer-summary-test-greedy_search.txt")
    with pytest.raises(SystemExit):  # argparse: at least one file
        _cli("wer-table", "--out", tmp_path / "wer.tsv")


def test_too_short_cut_gets_empty_hypothesis(setup: dict[str, Path], tmp_path: Path) -> None:
    from lhotse import CutSet, Recording, SupervisionSegment
    from lhotse.cut import MonoCut

    path = tmp_path / "short.wav"
    _write_babble(path, 0.06, seed=5)  # 6 frames < 9: Conv-Embed gives no output frame
    rec = Recording.from_file(path, recording_id="short")
    short = MonoCut(id="short", start=0.0, duration=rec.duration, channel=0, recording=rec,
                    supervisions=[SupervisionSegment(id="short", recording_id="short",
                                                     start=0.0, duration=rec.duration,
                                                     text="ALPHA BRAVO")])
    cuts = CutSet.from_cuts([short, *CutSet.from_file(setup["raw"]).subset(first=2)])
    manifest = tmp_path / "x_cuts_dev.jsonl.gz"
    cuts.to_file(manifest)
    out = tmp_path / "res"
    assert _cli("decode", "--model", setup["exp"] / "epoch-2.pt", "--bpe-model", setup["bpe"],
                "--cuts", manifest, "--result-dir", out, "--device", "cpu") == 0
    recogs = dict((cid, (ref, hyp)) for cid, ref, hyp in
                  read_recogs(out / "recogs-dev-greedy_search.txt"))
    assert recogs["short"] == (["ALPHA", "BRAVO"], [])
    assert len(recogs) == 3 and all(recogs[c][1] for c in ("utt0", "utt1"))


def test_unreadable_audio_fails_naming_the_cut(setup: dict[str, Path], tmp_path: Path) -> None:
    """A damaged audio file stops decoding with the cut named (a WER over fewer utterances than
    asked for would mislead), not with a codec's bare traceback."""
    from lhotse import CutSet
    from lhotse.utils import fastcopy

    cuts = list(CutSet.from_file(setup["raw"]))
    rec = cuts[0].recording
    bad = tmp_path / "damaged.flac"
    data = Path(rec.sources[0].source).read_bytes()
    bad.write_bytes(data[: len(data) // 3])  # a partial copy
    cuts[0] = fastcopy(cuts[0], recording=fastcopy(
        rec, sources=[fastcopy(rec.sources[0], source=str(bad))]))
    manifest = tmp_path / "cuts_damaged.jsonl.gz"
    CutSet.from_cuts(cuts).to_file(manifest)
    with pytest.raises(ZipasrError, match=f"cut {cuts[0].id}: cannot read its audio"):
        _decode(dict(setup, damaged=manifest), tmp_path / "out", "greedy_search",
                cuts="damaged")


def test_streaming_decoding_of_a_causal_model(setup: dict[str, Path], tmp_path: Path,
                                              capsys: pytest.CaptureFixture) -> None:
    """``--streaming`` (chunk by chunk, streams joining and leaving a batch) writes the same
    hypotheses as ``--chunk-size`` alone (the whole utterance with the chunk mask), under the
    result names icefall's suffixes give; another chunk size changes them (the comparison can
    fail); a causal model without streaming options sees whole utterances, deterministically
    (it would draw a chunk size per batch otherwise)."""
    out = tmp_path / "res"
    causal = setup["causal"]
    for method in ("greedy_search", "modified_beam_search"):
        key = "greedy_search" if method == "greedy_search" else f"{method}_beam-size-4"
        _decode(setup, out, method, "--streaming", "--chunk-size", "16",
                "--left-context-frames", "64", "--num-streams", "4", model=causal)
        _decode(setup, out, method, "--chunk-size", "16", "--left-context-frames", "64",
                model=causal)
        chunkwise = read_recogs(out / f"recogs-test-{key}-chunk-16-left-context-64.txt")
        simulated = read_recogs(
            out / f"recogs-test-{key}-chunk-16-left-context-64-simulated.txt")
        assert [r[0] for r in chunkwise] == [f"utt{i}" for i in range(N_CUTS)]
        assert len({tuple(h) for _, _, h in chunkwise}) == N_CUTS  # audio-dependent output
        assert chunkwise == simulated
        summary = (out / f"wer-summary-test-{key}-chunk-16-left-context-64.txt").read_text()
        assert summary.splitlines()[1].startswith(f"{key}-chunk-16-left-context-64\t")
    assert re.search(r"test\tgreedy_search-chunk-16-left-context-64\tWER ",
                     capsys.readouterr().out)
    _decode(setup, out, "greedy_search", "--streaming", "--chunk-size", "32",
            "--left-context-frames", "64", model=causal)
    other = read_recogs(out / "recogs-test-greedy_search-chunk-32-left-context-64.txt")
    assert other != read_recogs(out / "recogs-test-greedy_search-chunk-16-left-context-64.txt")
    for run in ("a", "b"):
        _decode(setup, tmp_path / run, "greedy_search", model=causal)
    assert (read_recogs(tmp_path / "a" / "recogs-test-greedy_search.txt")
            == read_recogs(tmp_path / "b" / "recogs-test-greedy_search.txt"))


@pytest.mark.parametrize("model,extra,message", [
    ("exp", ["--streaming"], "needs a causal model"),
    ("causal", ["--streaming", "--chunk-size", "12"], "multiple of every downsampling"),
    ("causal", ["--chunk-size", "16", "--left-context-frames", "40"], "multiple of the chunk"),
    ("causal", ["--streaming", "--chunk-size", "8", "--left-context-frames", "8"],
     "shorter than the convolutions' left context"),
    ("causal", ["--left-context-frames", "64"], "needs --chunk-size or --streaming"),
])
def test_streaming_refusals(setup: dict[str, Path], tmp_path: Path, model: str,
                            extra: list[str], message: str) -> None:
    path = setup[model] / "epoch-2.pt" if model == "exp" else setup[model]
    with pytest.raises(ZipasrError, match=message):
        _decode(setup, tmp_path, "greedy_search", *extra, model=path)
    assert not list(tmp_path.glob("recogs-*"))
