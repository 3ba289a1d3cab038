"""The whole DAG on the smoke config, through the real Snakemake: synthesize → manifests →
fbank → BPE → train → average → decode (both methods) → WER table; then incremental reruns:
what each kind of config change plans (dry runs), one real rerun after a beam change whose
WER table and MLflow results hold the new beam only, and one adding the LM and CTC methods
(the LMs train on the training transcripts only)."""

from __future__ import annotations

import copy
import gzip
import json
from pathlib import Path
from typing import Any

import torch
import yaml
from helpers import ROOT, planned_jobs, snakemake

# What a config change reruns after the whole smoke DAG ran ("all" is the target rule).
# Nothing upstream of the change runs again: not fbank for BPE, not BPE for the model.
AFTER_TRAIN = {"train": 1, "average": 1, "decode": 4, "score": 1, "export": 1, "plots": 1,
               "all": 1}
RERUNS: list[tuple[dict[str, Any], dict[str, int]]] = [
    # job sizes (threads) and tracking settings change no result: nothing reruns
    ({"train": {"threads": 2}, "features": {"num_jobs": 2},
      "corpus": {"synth": {"num_jobs": 2}},
      "tracking": {"metrics_interval": 3, "register_model": False, "experiment": "other"}}, {}),
    ({"model": {"use_ctc": False}}, AFTER_TRAIN),
    ({"train": {"base_lr": 0.03}}, AFTER_TRAIN),
    ({"bpe": {"vocab_size": 90}}, {"bpe": 1, **AFTER_TRAIN}),
    ({"average": {"use_averaged_model": True}},
     {"average": 1, "decode": 4, "score": 1, "export": 1, "plots": 1, "all": 1}),
    # the last batches instead of whole epochs: another averaged model, the same training
    ({"average": {"use_averaged_model": True, "last_batches": 8}},
     {"average": 1, "decode": 4, "score": 1, "export": 1, "plots": 1, "all": 1}),
    # the beam: beam-search decoding only (greedy search does not read it)
    ({"decode": {"beam": 2}}, {"decode": 2, "score": 1, "plots": 1, "all": 1}),
    # fewer methods: the table is remade from the decodings that exist
    ({"decode": {"methods": ["greedy_search"]}}, {"score": 1, "plots": 1, "all": 1}),
    # the ONNX export's options rerun the export only; turning it off reruns nothing
    ({"export": {"int8": False}}, {"export": 1, "all": 1}),
    ({"export": {"onnx": False}}, {}),
]


def merged(base: dict[str, Any], change: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``change`` merged in, recursively (``base`` is left as it is)."""
    out = copy.deepcopy(base)
    for k, v in change.items():
        out[k] = merged(out.get(k, {}), v) if isinstance(v, dict) else v
    return out


def test_smoke_dag_end_to_end_and_incremental(workdir: Path) -> None:
    smoke = yaml.safe_load((ROOT / "config" / "smoke.yaml").read_text())
    # MLflow in the scratch directory whatever the environment says (a tracking key: it
    # reruns nothing, checked below)
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    smoke["tracking"] = {"uri": uri}
    snakemake(workdir, smoke)
    exp = workdir / "exp" / "smoke"

    # features: 3x training cuts (speed perturbation), 80 bins at 100 frames/s
    with gzip.open(workdir / "data/fbank/synth_cuts_train.jsonl.gz", "rt") as f:
        train = [json.loads(line) for line in f]
    n_train = smoke["corpus"]["synth"]["num_train"]
    assert len(train) == 3 * n_train
    assert all(c["features"]["num_features"] == 80 for c in train)
    assert all(abs(c["features"]["frame_shift"] - 0.01) < 1e-9 for c in train)

    # training wrote its summary and epoch checkpoint; averaging produced a model
    summary = json.loads((exp / "train-summary.json").read_text())
    assert summary["batch_idx_train"] > 0 and summary["valid_loss"] > 0
    assert (exp / "epoch-1.pt").is_file() and (exp / "epoch-1_avg-1.pt").is_file()

    # decoding: both methods on dev and test, icefall-style files, one WER table
    for method, key in (("greedy_search", "greedy_search"),
                        ("modified_beam_search", "modified_beam_search_beam-size-4")):
        for part in ("dev", "test"):
            name = f"{part}-{key}-epoch-1_avg-1"
            for kind in ("recogs", "errs", "wer-summary"):
                assert (exp / method / f"{kind}-{name}.txt").is_file()
            recogs = (exp / method / f"recogs-{name}.txt").read_text()
            assert recogs.count("\tref=") == smoke["corpus"]["synth"]["num_" + part]
    table = (exp / "wer.tsv").read_text().splitlines()
    assert table[0].split("\t")[0] == "test_set" and len(table) == 3
    for row in table[1:]:
        assert all(0.0 <= float(v) for v in row.split("\t")[1:])
    for rule in ("synth", "fbank", "bpe", "train", "average", "decode", "score", "export"):
        assert list((workdir / "logs" / rule).glob("*.benchmark.tsv")), rule

    assert_sherpa_decodes_like_zipasr(workdir, exp, smoke["decode"].get("beam", 4))

    # nothing changed: nothing runs; each kind of change reruns from the rule reading it
    assert planned_jobs(workdir, smoke) == {}
    for change, expected in RERUNS:
        assert planned_jobs(workdir, merged(smoke, change)) == expected, change

    # a real rerun with another beam: the table has the new beam's column only, although
    # the beam-4 files stay on disk; greedy search was not decoded again
    greedy = exp / "greedy_search" / "wer-summary-test-greedy_search-epoch-1_avg-1.txt"
    greedy_mtime = greedy.stat().st_mtime_ns
    beam2 = merged(smoke, {"decode": {"beam": 2}})
    snakemake(workdir, beam2)
    header = (exp / "wer.tsv").read_text().splitlines()[0].split("\t")
    assert header == ["test_set", "greedy_search-epoch-1_avg-1",
                      "modified_beam_search_beam-size-2-epoch-1_avg-1"]
    beam_dir = exp / "modified_beam_search"
    assert (beam_dir / "wer-summary-test-modified_beam_search_beam-size-4-epoch-1_avg-1.txt"
            ).is_file()
    assert greedy.stat().st_mtime_ns == greedy_mtime
    assert planned_jobs(workdir, beam2) == {}
    assert_mlflow_logged_the_table(uri, exp / "wer.tsv")
    assert_lm_and_ctc_methods(workdir, exp, beam2)


def assert_lm_and_ctc_methods(workdir: Path, exp: Path, config: dict[str, Any]) -> None:
    """Every decoding method added to a finished run: the LMs train (rule lm, once, on the
    training transcripts only) and the new methods decode; nothing upstream reruns. Then what
    the LM settings and scales rerun."""
    from zipasr.decode.names import CTC_METHODS, LM_METHODS, METHODS

    every = merged(config, {"decode": {"methods": list(METHODS), "lm_scale": 0.3,
                                       "lodr_scale": -0.24}})
    new = len(LM_METHODS) + len(CTC_METHODS)
    after = {"decode": 2 * new, "score": 1, "plots": 1, "all": 1}
    assert planned_jobs(workdir, every) == {"lm": 1, **after}
    snakemake(workdir, every)
    header = (exp / "wer.tsv").read_text().splitlines()[0].split("\t")
    assert header[1:] == [f"{k}-epoch-1_avg-1" for k in (
        "greedy_search", "modified_beam_search_beam-size-2",
        "modified_beam_search_lm_shallow_fusion_beam-size-2_rnn-lm-scale-0.3",
        "modified_beam_search_LODR_beam-size-2_rnn-lm-scale-0.3_LODR-2gram-scale--0.24",
        "ctc_greedy_search", "ctc_prefix_beam_search_beam-size-2")]
    lm_dir = workdir / "data" / f"lm_bpe_{config['bpe']['vocab_size']}"
    summary = json.loads((lm_dir / "lm-summary.json").read_text())
    synth = config["corpus"]["synth"]
    # the training transcripts and nothing else (not their speed-perturbed copies, no test
    # text); dev text measured perplexity only
    assert summary["num_train_sentences"] == synth["num_train"]
    assert summary["num_valid_sentences"] == synth["num_dev"]
    assert (lm_dir / "lm.pt").is_file() and (lm_dir / "bigram.arpa").is_file()
    assert planned_jobs(workdir, every) == {}
    assert planned_jobs(workdir, merged(every, {"lm": {"num_epochs": 2}})) == {
        "lm": 1, **after, "decode": 2 * len(LM_METHODS)}
    assert planned_jobs(workdir, merged(every, {"decode": {"lodr_scale": -0.1}})) == {
        **after, "decode": 2}


def assert_sherpa_decodes_like_zipasr(workdir: Path, exp: Path, beam: int) -> None:
    """The export rule's {exp}/onnx/, run by sherpa-onnx itself on the test set's audio (one
    batch, as `zipasr decode` batched it), transcribes as `zipasr decode` did, per method; the
    int8 models within 1 % WER. And its encoder reproduces the PyTorch encoder on the stored
    features of that padded batch."""
    from lhotse import CutSet
    from onnx_helpers import agreement, read_recogs, recognizer, sherpa_decode

    from zipasr.decode.features import FeatureLoader, collate_features
    from zipasr.decode.model import load_model
    from zipasr.deploy.onnx_export import FP32_FILES, INT8_FILES, ort_session

    onnx_dir = exp / "onnx"
    assert sorted(p.name for p in onnx_dir.iterdir() if not p.name.startswith(".")) == sorted(
        [*FP32_FILES, *INT8_FILES, "tokens.txt"])
    cuts = CutSet.from_file(workdir / "data/fbank/synth_cuts_test.jsonl.gz").to_eager()
    cuts = cuts.with_recording_path_prefix(workdir).with_features_path_prefix(workdir)
    waves = [c.load_audio()[0] for c in cuts]
    for method, key in (("greedy_search", "greedy_search"),
                        ("modified_beam_search", f"modified_beam_search_beam-size-{beam}")):
        recogs = read_recogs(exp / method / f"recogs-test-{key}-epoch-1_avg-1.txt")
        for int8 in (False, True):
            results = sherpa_decode(recognizer(onnx_dir, method, beam, int8), waves)
            agree = agreement(recogs, {c.id: r.text for c, r in zip(cuts, results, strict=True)})
            print(f"sherpa-onnx {'int8' if int8 else 'fp32'} {method}: {agree}")
            if int8:
                assert abs(agree.wer_sherpa - agree.wer_zipasr) <= 1.0, (method, str(agree))
            else:
                assert agree.identical >= 0.99, (method, str(agree))
                assert abs(agree.wer_sherpa - agree.wer_zipasr) <= 0.2, (method, str(agree))

    model = load_model(exp / "epoch-1_avg-1.pt")
    x, x_lens = collate_features([FeatureLoader()(c) for c in cuts])
    with torch.no_grad():
        want, want_lens = model.forward_encoder(x, x_lens)
        want = model.joiner.encoder_proj(want)
    got, got_lens = ort_session(onnx_dir / "encoder.onnx").run(
        None, {"x": x.numpy(), "x_lens": x_lens.numpy()})
    assert got_lens.tolist() == want_lens.tolist()
    valid = (torch.arange(want.shape[1]) < want_lens.unsqueeze(1)).numpy()
    rel = abs(got[valid] - want.numpy()[valid]).max() / abs(want.numpy()[valid]).max()
    print(f"onnxruntime encoder vs PyTorch on the test batch: relative difference {rel:.2e}")
    assert rel <= 1e-4


def assert_mlflow_logged_the_table(uri: str, table_path: Path) -> None:
    """The last scoring's nested MLflow run holds exactly the WER table's cells and the result
    files of its columns (none of the beam-4 files still in the exp dir)."""
    from mlflow.tracking import MlflowClient

    from zipasr.track.results import metric_key

    table = [row.split("\t") for row in table_path.read_text().splitlines()]
    cells = {metric_key(row[0], table[0][i]): float(row[i])
             for row in table[1:] for i in range(1, len(table[0]))}
    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("zipasr-synth").experiment_id],
                              "tags.stage = 'decode'", order_by=["attributes.start_time DESC"])
    assert len(runs) == 2  # one nested run per scoring
    last = runs[0]
    assert {k: round(v, 2) for k, v in last.data.metrics.items()} == cells
    files = {a.path for d in ("greedy_search", "modified_beam_search")
             for a in client.list_artifacts(last.info.run_id, d)}
    assert len(files) == 2 * 2 * 3  # (dev, test) x (greedy, beam 2) x (recogs, errs, summary)
    assert not any("beam-size-4" in f for f in files)
