"""The LibriSpeech 960 h Zipformer-M run as the Slurm profile would submit it, planned on a fake
corpus tree (every part and MUSAN marked downloaded): every job of the real run is in the plan
(manifests per part, fbank shards and gathers per train part, MUSAN, BPE, training, decoding per
evaluation set and method), each with Slurm resources; docs/scale.md records this plan."""

from __future__ import annotations

from pathlib import Path

import yaml
from helpers import BIN, ROOT, tool_env

TRAIN = ["train-clean-100", "train-clean-360", "train-other-500"]
EVAL = ["dev-clean", "dev-other", "test-clean", "test-other"]
SPLITS = 8


def test_full_run_plan_lists_every_job(workdir: Path) -> None:
    import subprocess

    for part in TRAIN + EVAL:  # downloads done: the plan starts at the manifests
        (workdir / "data/download/LibriSpeech" / part).mkdir(parents=True)
        (workdir / "data/download/LibriSpeech" / part / ".completed").touch()
    (workdir / "data/download/.musan_completed").touch()
    overlay = workdir / "splits.yaml"
    overlay.write_text(yaml.safe_dump({"features": {"num_splits": SPLITS}}))
    proc = subprocess.run(
        [str(BIN / "snakemake"), "-s", str(ROOT / "Snakefile"), "-d", str(workdir), "-n",
         "--profile", str(ROOT / "workflow/profiles/slurm"), "--configfile",
         str(ROOT / "config/librispeech-960.yaml"), str(ROOT / "config/librispeech-960-M.yaml"),
         str(overlay)],
        cwd=workdir, env=tool_env(), capture_output=True, text=True)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    lines = out.splitlines()
    jobs = {}
    for line in lines[lines.index("Job stats:") + 3:]:
        parts = line.split()
        if len(parts) != 2 or not parts[1].isdigit():
            break
        jobs[parts[0]] = int(parts[1])
    print(jobs)
    assert jobs == {
        "prepare_librispeech": 7, "prepare_musan": 1, "bpe": 1,
        "split_manifests": 3, "fbank_shard": 3 * SPLITS, "gather_fbank": 3,
        "fbank": 4, "fbank_musan": 1,  # dev/test parts: one job each
        "train": 1, "average": 1, "decode": 4 * 2, "score": 1, "export": 1, "plots": 1,
        "all": 1, "total": 58,
    }
    for part in TRAIN:  # N pieces of every train part, each its own job
        pieces = {line.split(f"librispeech_feats_{part}.")[1].split()[0].rstrip(",")
                  for line in lines if f"librispeech_feats_{part}." in line}
        assert len(pieces) == SPLITS, (part, pieces)
    for part in EVAL:
        for method in ("greedy_search", "modified_beam_search"):
            assert f"wer-summary-{part}-{method}" in out, (part, method)
    # the cluster jobs carry their resources (the training job: 4 GPUs, as icefall's run)
    assert "gpu=4" in out
