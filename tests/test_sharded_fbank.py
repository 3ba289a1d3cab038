"""features.num_splits on the smoke corpus, through the real Snakemake: a train part's fbank as
N jobs (its manifests split by recording, `zipasr fbank` per piece, the pieces' cuts gathered)
gives the cuts of the single fbank job, cut for cut and feature for feature, in the same order;
the plan has N fbank jobs per train part, with the Slurm profile's fbank resources each; and a
change of num_splits reruns the train parts' features only, never the corpus or the manifests."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import yaml
from helpers import ROOT, planned_jobs, snakemake

SPLIT = {"split_manifests": 1, "fbank_shard": 3, "gather_fbank": 1}


def _smoke(num_splits: int | None = None) -> dict:
    cfg = yaml.safe_load((ROOT / "config" / "smoke.yaml").read_text())
    if num_splits is not None:
        cfg["features"]["num_splits"] = num_splits
    return cfg


def _job_stats(out: str) -> dict[str, int]:
    """rule -> job count from the "Job stats:" table a run prints first."""
    lines = out.splitlines()
    counts = {}
    for line in lines[lines.index("Job stats:") + 3:]:
        parts = line.split()
        if len(parts) != 2 or not parts[1].isdigit() or parts[0] == "total":
            break
        counts[parts[0]] = int(parts[1])
    return counts


def _resources(out: str) -> dict[str, set[str]]:
    """rule -> the key=value pairs of its first job's `resources:` line in a dry run."""
    res, rule = {}, None
    for line in out.splitlines():
        if line.startswith(("rule ", "localrule ")):
            rule = line.split()[1].rstrip(":")
        elif line.strip().startswith("resources:") and rule and rule not in res:
            res[rule] = set(re.split(r",\s*", line.split(":", 1)[1].strip()))
    return res


def test_split_fbank_gives_the_unsplit_cuts(workdir: Path) -> None:
    from lhotse import CutSet

    # 3 pieces of the train part; dev and test stay one fbank job each
    run = snakemake(workdir, _smoke(3), "data")
    assert _job_stats(run.stdout + run.stderr) == {
        "synth": 1, "bpe": 1, "fbank": 2, **SPLIT, "data": 1}
    fbank = workdir / "data" / "fbank"
    split = CutSet.from_file(fbank / "synth_cuts_train.jsonl.gz").to_eager()
    # the part's layout of an unsplit run: the pieces' features linked into its directory
    assert all(c.features.storage_path.startswith("data/fbank/synth_feats_train/piece")
               for c in split)
    split_feats = {c.id: c.with_features_path_prefix(workdir).load_features() for c in split}

    # back to one job: the train part's fbank only (not the corpus, manifests, BPE, dev, test)
    assert planned_jobs(workdir, _smoke(), "data") == {"fbank": 1, "data": 1}
    snakemake(workdir, _smoke(), "data")
    assert planned_jobs(workdir, _smoke(), "data") == {}

    whole = CutSet.from_file(fbank / "synth_cuts_train.jsonl.gz").to_eager()
    assert len(whole) == 3 * 60  # with the two speed-perturbed copies
    assert list(split.ids) == list(whole.ids)  # the same cuts in the same order
    for a, b in zip(split, whole, strict=True):
        assert (a.duration, a.start, a.recording) == (b.duration, b.start, b.recording)
        assert a.supervisions == b.supervisions
        assert a.features.num_frames == b.features.num_frames
        assert np.array_equal(split_feats[a.id],
                              b.with_features_path_prefix(workdir).load_features()), a.id

    # the pieces are still there: 3 again gathers them without recomputing; another N splits anew
    assert planned_jobs(workdir, _smoke(3), "data") == {"gather_fbank": 1, "data": 1}
    assert planned_jobs(workdir, _smoke(2), "data") == {**SPLIT, "fbank_shard": 2, "data": 1}

    # on Slurm, each piece is a job with the fbank job's resources
    out = snakemake(workdir, _smoke(3), "data", "-n", "--forceall", "--profile",
                    str(ROOT / "workflow" / "profiles" / "slurm")).stdout
    res = _resources(out)
    assert res["fbank_shard"] == res["fbank"], (res["fbank_shard"], res["fbank"])
    assert "runtime=720" in res["fbank_shard"]
