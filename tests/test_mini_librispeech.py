"""config/mini-librispeech.yaml: it validates against the schema, and Snakemake plans the whole
DAG with it (a dry run: no download) — the two mini_librispeech parts through every stage, the
options the train rule hands to ``zipasr train`` accepted by TrainConfig and the model config."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import yaml
from helpers import ROOT, snakemake

from zipasr.config import load_config, validate_config
from zipasr.model import ZipformerConfig
from zipasr.train.config import TrainConfig, training_options

RECIPE = ROOT / "config" / "mini-librispeech.yaml"


def test_recipe_validates() -> None:
    cfg = load_config(ROOT / "config" / "config.yaml", RECIPE)
    validate_config(cfg)
    assert cfg["corpus"]["name"] == "librispeech"
    assert cfg["corpus"]["train_parts"] == ["train-clean-5"]
    assert cfg["corpus"]["dev_parts"] == ["dev-clean-2"]
    assert cfg["features"]["speed_perturb"] == [0.9, 1.1]
    train = TrainConfig.from_dict(training_options(cfg["train"]))
    assert train.save_every_n % train.average_period == 0
    assert train.num_epochs > cfg["average"]["avg"]


def test_recipe_plans_the_whole_dag(workdir: Path) -> None:
    cfg = yaml.safe_load(RECIPE.read_text())
    proc = snakemake(workdir, cfg, "-n", "-p")
    out = proc.stdout + proc.stderr
    jobs = {}
    for line in out[out.index("Job stats:"):].splitlines()[3:]:
        if len(line.split()) != 2 or not line.split()[1].isdigit():
            break
        jobs[line.split()[0]] = int(line.split()[1])
    assert jobs == {"download_librispeech": 2, "prepare_librispeech": 2, "fbank": 2, "bpe": 1,
                    "train": 1, "average": 1, "decode": 2, "score": 1, "export": 1, "plots": 1,
                    "all": 1, "total": 15}
    exp = cfg["exp_dir"]
    avg = f"epoch-{cfg['train']['num_epochs']}_avg-{cfg['average']['avg']}_use-averaged-model"
    assert f"{exp}/{avg}.pt" in out and f"{exp}/wer.tsv" in out
    for method in ("greedy_search", "modified_beam_search"):
        assert re.search(rf"{exp}/{method}/wer-summary-dev-clean-2-{method}\S*-{avg}\.txt", out)
    fbank_train = next(line for line in out.splitlines()
                       if "zipasr fbank" in line and "train-clean-5" in line)
    assert "--speed-perturb 0.9 1.1 " in fbank_train

    # what the train job really receives
    train_cmd = shlex.split(next(line.split("Shell command: ", 1)[1]
                                 for line in out.splitlines() if " zipasr train " in line))
    model = json.loads(train_cmd[train_cmd.index("--model") + 1])
    train = json.loads(train_cmd[train_cmd.index("--train") + 1])
    assert ZipformerConfig.from_dict({**model, "vocab_size": cfg["bpe"]["vocab_size"]})
    tc = TrainConfig.from_dict(train)
    assert (tc.num_epochs, tc.max_duration, tc.lr_batches, tc.precision) == (
        cfg["train"]["num_epochs"], cfg["train"]["max_duration"], cfg["train"]["lr_batches"],
        "fp16")
    assert not (workdir / "data").exists()  # a dry run: nothing downloaded or written
