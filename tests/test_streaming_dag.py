"""The streaming path of the DAG on the smoke corpus, through the real Snakemake: a causal
model trained with icefall's per-batch chunk draws, decoded whole and chunk-wise at a
(chunk, left context) pair with a WER column each, exported for sherpa-onnx's
OnlineRecognizer; the chunk-wise results equal the whole-utterance simulation word for word,
and sherpa-onnx, fed the test audio in 0.1 s pieces, says what `zipasr decode --streaming`
said."""

from __future__ import annotations

import copy
import subprocess
from pathlib import Path

import torch
import yaml
from helpers import BIN, ROOT, make_peaky, planned_jobs, snakemake, tool_env

from zipasr.decode.scoring import read_recogs

CHUNK, LEFT = 16, 64  # 320 ms chunks; the smoke utterances are 1-3 s long


def streaming_smoke() -> dict:
    smoke = yaml.safe_load((ROOT / "config" / "smoke.yaml").read_text())
    smoke = copy.deepcopy(smoke)
    smoke["exp_dir"] = "exp/smoke-streaming"
    smoke["model"] = {**smoke["model"], "causal": True}
    smoke["decode"] = {**smoke["decode"],
                       "streaming": [{"chunk_size": CHUNK, "left_context_frames": LEFT}]}
    smoke["tracking"] = {"enabled": False}
    return smoke


def test_streaming_smoke_dag(workdir: Path) -> None:
    config = streaming_smoke()
    snakemake(workdir, config)
    exp = workdir / "exp" / "smoke-streaming"
    ckpt = torch.load(exp / "epoch-1.pt", map_location="cpu", weights_only=False)
    assert ckpt["model_config"]["causal"] is True
    assert list(ckpt["model_config"]["chunk_size"]) == [16, 32, 64, -1]

    suffix = "epoch-1_avg-1"
    streaming = f"chunk-{CHUNK}-left-context-{LEFT}"
    header = (exp / "wer.tsv").read_text().splitlines()[0].split("\t")
    assert header == ["test_set", f"greedy_search-{suffix}",
                      f"greedy_search-{streaming}-{suffix}",
                      f"modified_beam_search_beam-size-4-{suffix}",
                      f"modified_beam_search_beam-size-4-{streaming}-{suffix}"]

    # the whole-utterance simulation of the chunk-wise decoding, through the CLI
    cuts = workdir / "data/fbank/synth_cuts_test.jsonl.gz"
    bpe = workdir / "data/lang_bpe_80/bpe.model"
    zipasr("decode", "--model", exp / f"{suffix}.pt", "--bpe-model", bpe, "--cuts", cuts,
           "--method", "greedy_search", "--chunk-size", CHUNK, "--left-context-frames", LEFT,
           "--result-dir", workdir / "simulated", "--suffix", suffix, cwd=workdir)
    chunkwise = read_recogs(exp / "greedy_search" / f"recogs-test-greedy_search-{streaming}"
                            f"-{suffix}.txt")
    simulated = read_recogs(workdir / "simulated" / f"recogs-test-greedy_search-{streaming}"
                            f"-simulated-{suffix}.txt")
    assert chunkwise == simulated
    print("chunk-wise hypotheses:", [" ".join(h) for _, _, h in chunkwise])

    # the DAG's export: sherpa-onnx's streaming contract, and its hypotheses (the smoke model,
    # one epoch on 60 utterances, mostly says nothing yet)
    assert_sherpa_streams_like_zipasr(workdir, exp / "onnx", exp, f"{streaming}-{suffix}")
    # the same tools on a model that talks: the averaged model made peaky, exported and
    # transcribing the test audio chunk-wise through the CLI
    assert_sherpa_agrees_on_a_talking_model(workdir, exp / f"{suffix}.pt", cuts, bpe)

    # another pair decodes and scores again, nothing else (the export keeps the first pair)
    more = copy.deepcopy(config)
    more["decode"]["streaming"].append({"chunk_size": 32, "left_context_frames": 64})
    assert planned_jobs(workdir, more) == {"decode": 4, "score": 1, "plots": 1, "all": 1}
    # a pair the model cannot decode with stops the DAG before any job
    bad = copy.deepcopy(config)
    bad["decode"]["streaming"] = [{"chunk_size": 12, "left_context_frames": 48}]
    proc = snakemake(workdir, bad, "-n", check=False)
    assert proc.returncode != 0 and "decode.streaming: chunk size 12" in proc.stdout + proc.stderr


def zipasr(*argv: object, cwd: Path) -> None:
    proc = subprocess.run([str(BIN / "zipasr"), *map(str, argv)], cwd=cwd, env=tool_env(),
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]


def assert_sherpa_streams_like_zipasr(workdir: Path, onnx_dir: Path, result_dir: Path,
                                      tail_key: str) -> list[list[str]]:
    """A streaming export in sherpa-onnx's OnlineRecognizer: each test utterance's audio fed
    in 0.1 s pieces, then enough silence for its last frames to fall in a decoded chunk
    (sherpa drops a partial last chunk), gives what `zipasr decode --streaming` wrote to
    ``result_dir``, per method, on at least 99 % of the utterances. Returns the hypotheses."""
    from lhotse import CutSet
    from onnx_helpers import agreement, read_recogs, recognizer, sherpa_stream_decode

    from zipasr.deploy.onnx_export import read_metadata

    meta = read_metadata(onnx_dir / "encoder.onnx")
    assert meta["decode_chunk_len"] == str(2 * CHUNK) and meta["T"] == str(2 * CHUNK + 13)
    cuts = CutSet.from_file(workdir / "data/fbank/synth_cuts_test.jsonl.gz").to_eager()
    cuts = cuts.with_recording_path_prefix(workdir)
    waves = [c.load_audio()[0] for c in cuts]
    tail = (2 * CHUNK + 13) * 0.01 + 0.05  # a whole chunk's frames of silence, and a margin
    for method, key in (("greedy_search", "greedy_search"),
                        ("modified_beam_search", "modified_beam_search_beam-size-4")):
        recogs = read_recogs(result_dir / method / f"recogs-test-{key}-{tail_key}.txt")
        results, _ = sherpa_stream_decode(recognizer(onnx_dir, method, 4, online=True), waves,
                                          tail, together=True)
        agree = agreement(recogs, {c.id: r.text for c, r in zip(cuts, results, strict=True)})
        print(f"sherpa-onnx OnlineRecognizer {method}: {agree}")
        assert agree.identical >= 0.99, (method, str(agree))
    return [hyp for _, hyp in recogs.values()]


def assert_sherpa_agrees_on_a_talking_model(workdir: Path, model_pt: Path, cuts_path: Path,
                                            bpe: Path) -> None:
    """An untrained model made to talk (``make_peaky``) emits tokens on every frame, the tail
    padding too, where sherpa-onnx (which hears appended silence: fbank of zeros) and zipasr
    (which pads features with log(1e-10)) see different input by design. So they are
    compared on the chunks both see alike, those whose 2 x chunk + 13 frames lie within the
    audio: the tokens emitted there must be the same, for every test utterance."""
    import json

    from lhotse import CutSet
    from onnx_helpers import recognizer, result_ids, sherpa_stream_decode

    from zipasr.decode.model import load_model

    cuts = CutSet.from_file(cuts_path).with_features_path_prefix(workdir)
    cuts = cuts.with_recording_path_prefix(workdir).to_eager()
    feats = [torch.from_numpy(c.load_features()) for c in cuts]
    torch.manual_seed(0)
    talker = make_peaky(load_model(model_pt), feats)
    talker_pt = workdir / "talker" / "talker.pt"
    talker_pt.parent.mkdir()
    torch.save({"model": talker.state_dict(), "model_config": talker.config.to_dict()},
               talker_pt)
    onnx_dir = workdir / "talker" / "onnx"
    zipasr("export-onnx", "--model", talker_pt, "--bpe-model", bpe, "--out-dir", onnx_dir,
           "--streaming", "--chunk-size", CHUNK, "--left-context-frames", LEFT, cwd=workdir)
    audio = [c.recording.sources[0].source for c in cuts]
    waves = [c.load_audio()[0] for c in cuts]
    frames_per_chunk = CHUNK // 2  # encoder frames (40 ms)
    for method in ("greedy_search", "modified_beam_search"):
        proc = subprocess.run(
            [str(BIN / "zipasr"), "transcribe", "--model", str(talker_pt), "--bpe-model",
             str(bpe), "--method", method, "--json", "--streaming", "--chunk-size", str(CHUNK),
             "--left-context-frames", str(LEFT), *audio],
            cwd=workdir, env=tool_env(), capture_output=True, text=True, check=True)
        ours = [json.loads(line) for line in proc.stdout.splitlines()]
        results, _ = sherpa_stream_decode(recognizer(onnx_dir, method, 4, online=True), waves,
                                          (2 * CHUNK + 13) * 0.01 + 0.05, together=True)
        same, compared = 0, 0
        for cut, mine, theirs in zip(cuts, ours, results, strict=True):
            n = cut.num_frames  # feature frames of the audio
            full = max(0, (n - 13) // (2 * CHUNK)) * frames_per_chunk  # frames seen alike
            mine_ids = [t for t, s in zip(mine["token_ids"], mine["timestamps"], strict=True)
                        if round(s / 0.04) < full]
            their_ids = [t for t, s in zip(result_ids(theirs, onnx_dir / "tokens.txt"),
                                            theirs.timestamps, strict=True)
                         if round(s / 0.04) < full]
            compared += len(mine_ids)
            same += mine_ids == their_ids
        print(f"talking model, {method}: {same} of {len(cuts)} utterances agree on "
              f"{compared} tokens in the chunks both see alike")
        assert same == len(cuts) and compared >= 3 * len(cuts), method
