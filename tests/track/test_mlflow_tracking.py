"""A tracked pipeline run in a real MLflow SQLite backend: params, lineage tags, curves at the
configured interval, validation loss, artifacts, WERs in the training run and a nested decode
run, the registered averaged model; resume continues the same run."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

from track_helpers import TINY_TRAIN, tracking_env, train_cmd


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def test_training_run_params_tags_metrics_artifacts(tracked_project) -> None:
    from helpers import ROOT

    def md5(path: Path) -> str:
        return hashlib.md5(path.read_bytes()).hexdigest()

    c = _client(tracked_project["uri"])
    run = c.get_run(tracked_project["run_id"])
    exp = tracked_project["exp"]
    assert run.info.run_name == "smoke" and run.info.status == "FINISHED"
    assert c.get_experiment(run.info.experiment_id).name == "zipasr-synth"
    # the resolved config, flattened
    p = run.data.params
    assert p["bpe.vocab_size"] == "80" and p["model.preset"] == "xs"
    assert p["tracking.metrics_interval"] == "4" and p["decode.methods"] == "['greedy_search']"
    assert int(p["num_params"]) > 0 and p["resolved.train.num_epochs"] == "1"
    # lineage: code version, data hashes (DVC's md5), corpus, preset, host, device
    t = run.data.tags
    # the commit that ran is HEAD or (others commit concurrently) one of its ancestors
    assert len(t["git.commit"]) == 40 and t["git.dirty"] in ("true", "false")
    assert subprocess.run(["git", "merge-base", "--is-ancestor", t["git.commit"], "HEAD"],
                          cwd=ROOT).returncode == 0
    data = tracked_project["root"] / "data"
    assert t["data.bpe.model.md5"] == md5(data / "lang_bpe_80" / "bpe.model")
    assert t["data.synth_cuts_train.jsonl.gz.md5"] == md5(data / "fbank/synth_cuts_train.jsonl.gz")
    assert (t["corpus"], t["preset"], t["device"]) == ("synth", "xs", "cpu") and t["host"]

    # curves: every 4th batch (metrics.jsonl has every 2nd), validation loss per epoch
    records = [json.loads(ln) for ln in (exp / "metrics.jsonl").read_text().splitlines()]
    train_batches = [r["batch"] for r in records if "loss" in r]
    loss = c.get_metric_history(run.info.run_id, "loss")
    assert [m.step for m in loss] == [b for b in train_batches if b % 4 == 0]
    by_batch = {r["batch"]: r for r in records if "loss" in r}
    assert all(abs(m.value - by_batch[m.step]["loss"]) < 1e-9 for m in loss)
    for key in ("lr", "simple_loss", "pruned_loss", "audio_per_second", "grad_clip_factor"):
        assert c.get_metric_history(run.info.run_id, key), key
    valid = c.get_metric_history(run.info.run_id, "valid_loss_epoch")
    assert [v.value for v in valid] == [r["valid_loss"] for r in records if "valid_loss" in r]

    arts = {a.path for a in c.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "lang", "train", "logs", "wer.tsv"} <= arts
    assert {a.path for a in c.list_artifacts(run.info.run_id, "lang")} == {
        "lang/bpe.model", "lang/tokens.txt"}
    assert "train/metrics.jsonl" in {a.path for a in c.list_artifacts(run.info.run_id, "train")}
    assert "logs/exp_smoke.log" in {a.path for a in c.list_artifacts(run.info.run_id, "logs")}


def test_wers_results_and_registered_model(tracked_project) -> None:
    import mlflow.pytorch
    import torch

    c = _client(tracked_project["uri"])
    rid, exp = tracked_project["run_id"], tracked_project["exp"]
    run = c.get_run(rid)
    table = (exp / "wer.tsv").read_text().splitlines()
    header = table[0].split("\t")
    expected = {f"wer/{row.split(chr(9))[0]}/{header[i]}": float(row.split("\t")[i])
                for row in table[1:] for i in range(1, len(header))}
    assert len(expected) == 2  # dev and test, greedy search
    got = {k: v for k, v in run.data.metrics.items() if k.startswith("wer/")}
    assert got.keys() == expected.keys()
    assert all(abs(got[k] - expected[k]) < 0.01 for k in expected)

    # nested decode run with the errs/recogs files
    children = c.search_runs([run.info.experiment_id],
                             f"tags.mlflow.parentRunId = '{rid}'")
    assert [ch.info.run_name for ch in children] == ["decode epoch-1_avg-1"]
    files = {a.path for a in c.list_artifacts(children[0].info.run_id, "greedy_search")}
    for part in ("dev", "test"):
        for kind in ("errs", "recogs", "wer-summary"):
            assert f"greedy_search/{kind}-{part}-greedy_search-epoch-1_avg-1.txt" in files

    # the averaged model: logged with mlflow.pytorch, registered under the corpus' name
    versions = c.search_model_versions("name='zipasr-synth'")
    assert len(versions) == 1 and versions[0].run_id == rid
    mlflow.set_tracking_uri(tracked_project["uri"])
    net = mlflow.pytorch.load_model("models:/zipasr-synth/1")
    ref = torch.load(exp / "epoch-1_avg-1.pt", map_location="cpu", weights_only=False)["model"]
    state = net.state_dict()
    assert state.keys() == ref.keys()
    assert all(torch.equal(state[k], ref[k]) for k in ref)


def test_rescoring_does_not_log_the_same_model_twice(tracked_project) -> None:
    from track_helpers import BIN, clean_env

    from zipasr.track.spec import ENV, spec_from_config

    env = clean_env()
    cfg = dict(tracked_project["config"])
    import yaml
    from helpers import ROOT

    full = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    from zipasr.config import merge_into

    merge_into(full, cfg)
    env[ENV] = spec_from_config(full).to_env()
    root, exp = tracked_project["root"], tracked_project["exp"]
    proc = subprocess.run([str(BIN / "zipasr"), "track-results", "--exp-dir", str(exp),
                           "--model", str(exp / "epoch-1_avg-1.pt")], cwd=root, env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "already logged" in proc.stderr
    c = _client(tracked_project["uri"])
    assert len(c.search_model_versions("name='zipasr-synth'")) == 1
    children = c.search_runs([tracked_project["experiment_id"]],
                             f"tags.mlflow.parentRunId = '{tracked_project['run_id']}'")
    assert len(children) == 2  # one nested decode run per scoring


def test_resume_continues_the_same_run(tiny_corpus, tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = tracking_env(uri)
    exp = tmp_path / "exp"
    first = subprocess.run(train_cmd(tiny_corpus, exp), env=env, cwd=tmp_path,
                           capture_output=True, text=True)
    assert first.returncode == 0, first.stderr[-3000:]
    rid = json.loads((exp / "mlflow-run.json").read_text())["run_id"]
    c = _client(uri)
    steps1 = [m.step for m in c.get_metric_history(rid, "loss")]
    # num_epochs is a resumable change: the second call resumes at epoch 2
    summary_file = exp / "train-summary.json"
    second = subprocess.run(train_cmd(tiny_corpus, exp, {**TINY_TRAIN, "num_epochs": 2})
                            + ["--summary", str(summary_file)],
                            env=env, cwd=tmp_path, capture_output=True, text=True)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from" in second.stderr and "continuing run" in second.stderr
    assert json.loads((exp / "mlflow-run.json").read_text())["run_id"] == rid
    runs = c.search_runs([c.get_run(rid).info.experiment_id])
    assert [r.info.run_id for r in runs] == [rid]
    steps2 = [m.step for m in c.get_metric_history(rid, "loss")]
    assert steps2[:len(steps1)] == steps1 and max(steps2) > max(steps1)
    assert len(c.get_metric_history(rid, "valid_loss_epoch")) == 2
    assert c.get_run(rid).info.status == "FINISHED"

    # the numerics facts (zipasr.train.numerics): tags of the first run, summary of the resumed
    # one, alike (same machine) and as /proc/cpuinfo and torch say
    import torch

    n = json.loads(summary_file.read_text())["numerics"]
    tags = c.get_run(rid).data.tags
    assert json.loads(summary_file.read_text())["numerics_changes"] == []
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    if "model name" in cpuinfo:
        model = cpuinfo.split("model name", 1)[1].split(":", 1)[1].splitlines()[0].strip()
        assert tags["numerics.cpu.model"] == n["cpu"]["model"] == model
        flags = cpuinfo.split("\nflags", 1)[1].split(":", 1)[1].splitlines()[0].split()
        assert tags["numerics.cpu.flags.avx512_bf16"] == str("avx512_bf16" in flags)
    assert tags["numerics.cpu.torch_capability"] == torch.backends.cpu.get_cpu_capability()
    assert tags["numerics.joiner_bf16"] == str(n["joiner_bf16"]) == "False"  # not asked for
    assert tags["numerics.precision"] == "fp32" and tags["numerics.torch"] == torch.__version__
    threads = env["OMP_NUM_THREADS"]  # one torch thread per process, as the tools run
    assert tags["numerics.threads.torch"] == threads == str(n["threads"]["torch"])
    assert tags["numerics.threads.world_size"] == "1" and n["mkl"] == tags["numerics.mkl"]
