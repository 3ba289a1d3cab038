"""The LibriSpeech 960 h recipes are a base, config/librispeech-960.yaml (what S, M and L share),
and per-model overlays config/librispeech-960-{S,M,L}.yaml: base + overlay, merged in order over
config/config.yaml as Snakemake merges --configfile files, resolve to exactly the recipes as they
were when each file repeated the shared settings (tests/data/recipes_resolved.yaml); an overlay
given without its base stops the workflow at load, naming the base. A model.vocab_size that
disagrees with bpe.vocab_size is rejected when the DAG loads and by ``zipasr train``.

config/librispeech-960-M-streaming.yaml, an overlay of the M recipe: merged in order over
config/config.yaml, the base and config/librispeech-960-M.yaml it validates, holds icefall's
streaming Zipformer-M run (egs/librispeech/ASR/RESULTS.md, 66,110,931 parameters) and nothing else
that differs from the M recipe; Snakemake plans it from the three files given on the command line as
``make run CONFIG="..."`` passes them. And ``average.epoch``: the DAG averages at that epoch
(default: train.num_epochs) and rejects one after the last epoch trained when it loads, as it
rejects a causal model's chunk lists that training could not use."""

from __future__ import annotations

import copy
import json
import shlex
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import ROOT, snakemake

from zipasr.config import load_config, merge_into, validate_config
from zipasr.model import Transducer, ZipformerConfig
from zipasr.train.config import TrainConfig, training_options

DEFAULT = ROOT / "config" / "config.yaml"
BASE = ROOT / "config" / "librispeech-960.yaml"
M = ROOT / "config" / "librispeech-960-M.yaml"
STREAMING = ROOT / "config" / "librispeech-960-M-streaming.yaml"

# icefall's run: train.py --causal 1 --num-epochs 40 (chunk / left-context lists: train.py's
# defaults); decode.py --epoch 30 --avg 8 --use-averaged-model 1 at 16 / 128 and 32 / 256
OVERLAY: dict[str, Any] = {
    "exp_dir": "exp/librispeech-960-M-streaming",
    "model": {"causal": True, "chunk_size": [16, 32, 64, -1],
              "left_context_frames": [64, 128, 256, -1]},
    "train": {"num_epochs": 40},
    "average": {"epoch": 30, "avg": 8, "use_averaged_model": True},
    "decode": {"streaming": [{"chunk_size": 16, "left_context_frames": 128},
                             {"chunk_size": 32, "left_context_frames": 256}]},
}
AVG = "epoch-30_avg-8_use-averaged-model"


def test_streaming_recipe_is_the_m_recipe_plus_icefalls_streaming_run() -> None:
    cfg = load_config(DEFAULT, BASE, M, STREAMING)
    validate_config(cfg)
    assert load_config(STREAMING) == OVERLAY
    m = load_config(DEFAULT, BASE, M)
    assert cfg == merge_into(copy.deepcopy(m), OVERLAY)  # everything else is the M recipe's
    # what the overlay leans on from the M recipe: icefall's M on LibriSpeech 960 h, fp16,
    # max-duration 1000 per GPU
    assert cfg["model"]["preset"] == "M" and cfg["model"]["use_ctc"] is False
    assert cfg["bpe"]["vocab_size"] == 500
    assert cfg["corpus"]["train_parts"] == ["train-clean-100", "train-clean-360",
                                            "train-other-500"]
    train = TrainConfig.from_dict(training_options(cfg["train"]))
    assert (train.num_epochs, train.max_duration, train.precision) == (40, 1000, "fp16")
    assert cfg["average"]["epoch"] - cfg["average"]["avg"] >= 1  # epoch-22.pt exists

    model_cfg = ZipformerConfig.from_dict({**cfg["model"], "vocab_size": 500})
    assert model_cfg.causal
    with torch.device("meta"):
        n = sum(p.numel() for p in Transducer(model_cfg).parameters())
    assert n == 66_110_931
    # each decoding setting is one the model accepts
    for s in cfg["decode"]["streaming"]:
        ZipformerConfig.from_dict({**cfg["model"], "chunk_size": [s["chunk_size"]],
                                   "left_context_frames": [s["left_context_frames"]]})


def _shell_command(out: str, needle: str) -> list[str]:
    return shlex.split(next(line.split("Shell command: ", 1)[1] for line in out.splitlines()
                            if "Shell command: " in line and needle in line))


def _job_stats(out: str) -> dict[str, int]:
    jobs = {}
    for line in out[out.index("Job stats:"):].splitlines()[3:]:
        if len(line.split()) != 2 or not line.split()[1].isdigit():
            break
        jobs[line.split()[0]] = int(line.split()[1])
    return jobs


def test_snakemake_plans_the_two_files_in_order(workdir: Path) -> None:
    """As `make run CONFIG="config/librispeech-960.yaml config/librispeech-960-M.yaml
    config/...-streaming.yaml"` passes them: one --configfile with the three files (a dry run:
    nothing downloaded)."""
    proc = snakemake(workdir, None, "-n", "-p", "--configfile", str(BASE), str(M), str(STREAMING))
    out = proc.stdout + proc.stderr
    jobs = _job_stats(out)
    assert jobs["train"] == 1 and jobs["average"] == 1 and jobs["score"] == 1
    exp = OVERLAY["exp_dir"]

    train_cmd = _shell_command(out, " zipasr train ")
    assert train_cmd[train_cmd.index("--exp-dir") + 1] == exp
    model = json.loads(train_cmd[train_cmd.index("--model") + 1])
    assert model == {"preset": "M", "use_ctc": False, **OVERLAY["model"]}
    train = TrainConfig.from_dict(json.loads(train_cmd[train_cmd.index("--train") + 1]))
    assert train.num_epochs == 40

    avg_cmd = _shell_command(out, " average ")
    assert avg_cmd[avg_cmd.index("--epoch") + 1] == "30"
    assert avg_cmd[avg_cmd.index("--avg") + 1] == "8"
    assert "--use-averaged-model" in avg_cmd
    assert avg_cmd[avg_cmd.index("--out") + 1] == f"{exp}/{AVG}.pt"
    # decoding and the table use that model
    assert f"{exp}/wer.tsv" in out
    assert f"-{AVG}.txt" in out and "epoch-40_" not in out
    assert not (workdir / "data").exists()


def _smoke(**changes: Any) -> dict[str, Any]:
    import yaml

    cfg = yaml.safe_load((ROOT / "config" / "smoke.yaml").read_text())
    return merge_into(cfg, changes)


@pytest.mark.parametrize("average,expected", [({}, "epoch-3_avg-1"),
                                              ({"epoch": 2}, "epoch-2_avg-1")])
def test_average_epoch_defaults_to_the_last_epoch(workdir: Path, average: dict,
                                                  expected: str) -> None:
    cfg = _smoke(train={"num_epochs": 3}, average=average)
    out = snakemake(workdir, cfg, "-n", "-p").stdout
    avg_cmd = _shell_command(out, " average ")
    assert avg_cmd[avg_cmd.index("--epoch") + 1] == expected.split("_")[0].split("-")[1]
    assert avg_cmd[avg_cmd.index("--out") + 1] == f"exp/smoke/{expected}.pt"


def test_average_epoch_after_the_last_epoch_fails_at_load(workdir: Path) -> None:
    cfg = _smoke(train={"num_epochs": 3}, average={"epoch": 4})
    proc = snakemake(workdir, cfg, "-n", check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "WorkflowError" in out
    assert "average.epoch 4 is after the last epoch trained, train.num_epochs 3" in out
    assert "Job stats:" not in out  # nothing planned
    assert not (workdir / "data").exists()


def test_bad_chunk_lists_fail_at_load(workdir: Path) -> None:
    """A causal model's chunk lists are checked when the DAG loads, not by the train job after
    data preparation: xs needs 16 frames of left context ((5 // 2) * 8 at its 1/8-rate stack)."""
    cfg = _smoke(model={"causal": True, "chunk_size": [8, -1], "left_context_frames": [8, -1]})
    proc = snakemake(workdir, cfg, "-n", check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "WorkflowError" in out
    assert "model: chunk_size 8 with left_context_frames 8 gives 8 * max(1, 8 // 8) = 8" in out
    assert "Job stats:" not in out and not (workdir / "data").exists()


# -- the base and its overlays ---------------------------------------------------------------

RESOLVED = ROOT / "tests" / "data" / "recipes_resolved.yaml"
RECIPES = {"S": [BASE, ROOT / "config" / "librispeech-960-S.yaml"],
           "M": [BASE, M],
           "L": [BASE, ROOT / "config" / "librispeech-960-L.yaml"],
           "M-streaming": [BASE, M, STREAMING]}


def _snakemake_merge(*paths: Path) -> dict[str, Any]:
    """config/config.yaml, then each file, merged by Snakemake's own function."""
    import yaml
    from snakemake.utils import update_config

    cfg: dict[str, Any] = {}
    for p in (DEFAULT, *paths):
        update_config(cfg, yaml.safe_load(Path(p).read_text()) or {})
    return cfg


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_base_plus_overlay_resolves_to_the_recipe_as_it_was(name: str) -> None:
    """tests/data/recipes_resolved.yaml holds each recipe's files as they were before the split
    (config/librispeech-960-{S,M,L}.yaml at commit cf80a2f, with the streaming overlay merged
    over M); merged over today's config/config.yaml it is what base + overlay must resolve to."""
    import yaml

    before = yaml.safe_load(RESOLVED.read_text())[name]
    expected = merge_into(load_config(DEFAULT), before)
    resolved = load_config(DEFAULT, *RECIPES[name])
    assert resolved == expected
    assert _snakemake_merge(*RECIPES[name]) == resolved  # load_config merges like Snakemake
    validate_config(resolved)


@pytest.mark.parametrize("size", ["S", "M", "L"])
def test_overlays_hold_only_what_differs(size: str) -> None:
    """Of the base's settings an overlay repeats only corpus.name (its guard against being used
    alone); the rest of each overlay is what S, M and L set differently."""
    def leaves(d: dict, prefix: str = "") -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(leaves(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v})
        return out

    base = leaves(load_config(BASE))
    overlay = leaves(load_config(RECIPES[size][1]))
    assert set(base) & set(overlay) == {"corpus.name"}
    assert overlay["corpus.name"] == base["corpus.name"] == "librispeech"
    assert set(overlay) == {"exp_dir", "corpus.name", "model.preset", "train.base_lr",
                            "train.max_duration", "average.avg"}
    assert overlay["model.preset"] == size and overlay["exp_dir"] == f"exp/librispeech-960-{size}"


@pytest.mark.parametrize("files", [["librispeech-960-M.yaml"],
                                   ["librispeech-960-M.yaml", "librispeech-960-M-streaming.yaml"]],
                         ids=["M", "M-streaming"])
def test_overlay_without_its_base_fails_at_load(workdir: Path, files: list[str]) -> None:
    """Alone, an overlay would train Zipformer-M on config/config.yaml's synthetic corpus: its
    corpus.name librispeech meets the synth parts, and the workflow names the base to add."""
    proc = snakemake(workdir, None, "-n", "--configfile",
                     *(str(ROOT / "config" / f) for f in files), check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "WorkflowError" in out
    assert "corpus.name librispeech: unknown part(s) train, dev, test" in out
    assert "--configfile config/librispeech-960.yaml config/librispeech-960-M.yaml" in out
    assert "Job stats:" not in out and not (workdir / "data").exists()


# -- model.vocab_size: the BPE model's size or an error --------------------------------------

def test_model_vocab_size_that_disagrees_with_bpe_fails_at_load(workdir: Path) -> None:
    cfg = _smoke()
    cfg = merge_into(cfg, {"model": {"vocab_size": cfg["bpe"]["vocab_size"] + 1}})
    proc = snakemake(workdir, cfg, "-n", check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "WorkflowError" in out
    v = cfg["bpe"]["vocab_size"]
    assert f"model.vocab_size {v + 1} disagrees with bpe.vocab_size {v}" in out
    assert "Job stats:" not in out and not (workdir / "data").exists()


def test_train_rejects_model_vocab_size_other_than_the_bpe_models(tmp_path: Path) -> None:
    from zipasr.errors import ZipasrError
    from zipasr.lang.bpe import train_bpe
    from zipasr.train.trainer import Trainer

    words = "one two three four five six seven eight nine ten".split()
    text = tmp_path / "text.txt"
    text.write_text("\n".join(" ".join(words[i:] + words[:i]) for i in range(10)) * 5 + "\n")
    bpe = train_bpe(text, tmp_path / "lang", 24)

    def build(model: dict[str, Any]) -> Trainer:
        t = Trainer(TrainConfig.from_dict({"device": "cpu"}), model, train_cuts=[],
                    valid_cuts=[], bpe_model=bpe, exp_dir=tmp_path / "exp", progress=False)
        t._setup()
        return t

    with pytest.raises(ZipasrError, match=r"model.vocab_size 500 disagrees with the BPE "
                                          r"model's vocabulary size 24"):
        build({"preset": "xs", "vocab_size": 500})
    # the BPE model's size, given or not, builds the model
    assert build({"preset": "xs", "vocab_size": 24}).model_config.vocab_size == 24
    assert build({"preset": "xs"}).model_config.vocab_size == 24


def test_average_last_batches_plans_its_window(workdir: Path) -> None:
    """average.last_batches: the average rule gets --last-batches instead of --avg, the model
    its own name, and a window longer than the checkpoints kept fails at load."""
    cfg = _smoke(average={"use_averaged_model": True, "last_batches": 8},
                 train={"save_every_n": 4, "keep_last_k": 3})
    out = snakemake(workdir, cfg, "-n", "-p").stdout
    avg_cmd = _shell_command(out, " average ")
    assert avg_cmd[avg_cmd.index("--last-batches") + 1] == "8" and "--avg" not in avg_cmd
    assert avg_cmd[avg_cmd.index("--out") + 1] == \
        "exp/smoke/epoch-1_last-8-batches_use-averaged-model.pt"
    for average, train, message in (
            ({"use_averaged_model": True, "last_batches": 9}, {"save_every_n": 4, "keep_last_k": 3},
             "average.last_batches 9 reaches further back than the checkpoints kept: "
             "train.keep_last_k 3 x save_every_n 4 batches; raise keep_last_k to at least 4"),
            ({"use_averaged_model": False, "last_batches": 8}, {},
             "average.last_batches needs average.use_averaged_model: true"),
            ({"use_averaged_model": True, "last_batches": 8, "epoch": 1}, {"num_epochs": 2},
             "average.epoch before the last epoch needs train.keep_last_k: 0")):
        proc = snakemake(workdir, _smoke(average=average, train=train), "-n", check=False)
        got = proc.stdout + proc.stderr
        assert proc.returncode != 0 and "WorkflowError" in got and message in got, got[-2000:]
        assert "Job stats:" not in got
