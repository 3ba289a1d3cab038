"""Atomic outputs under SIGKILL: fbank, bpe, average, decode and wer-table (the score rule).

Each test runs the real ``zipasr`` subcommand with the arguments its rule uses, in a subprocess
started through ``tests/kill_at.py``, which SIGKILLs it at chosen moments of writing: partway
through the bytes of an output (catching a writer that writes the final name in pieces) and
just before the rename onto a final name (catching several outputs that become final one by
one). After every kill no output the rule declares exists under its final name, so Snakemake
sees the job as not done and runs it again; the temporaries the killed process could not remove
are there. The kills run in turn in one directory, then the same command runs uninterrupted:
it succeeds, its outputs are complete, and no temporary is left, neither the killed runs' (the
rerun removes them: the decision taken in zipasr.io) nor any in $TMPDIR.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from helpers import BIN, build_tiny_corpus, tool_env

LAUNCHER = Path(__file__).with_name("kill_at.py")
AVG = "epoch-2_avg-2"  # the averaged model's name, and decode's --suffix, as in the rules
VOCAB = 24


@dataclass
class Stage:
    argv: list[str]  # the zipasr subcommand and its arguments
    root: Path  # every output and temporary of the stage lives under it
    outputs: list[Path]  # what the rule declares: never present after a kill
    kills: list[dict]  # kill_at.py triggers, run in turn
    check: Callable[[str], None]  # checks the outputs of the clean rerun (given its stdout)
    # written, but not declared (decode's recogs/errs): may be present after a kill, but
    # then complete, i.e. equal to what the clean rerun writes
    side: list[Path] = field(default_factory=list)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny corpus (manifests, features, BPE) and an untrained xs model's two epoch
    checkpoints, as the trainer writes them."""
    from zipasr.model import Transducer

    root = tmp_path_factory.mktemp("atomic-inputs")
    paths = build_tiny_corpus(root, num_train=8)
    torch.manual_seed(0)
    model = Transducer.from_preset("xs", vocab_size=VOCAB)
    exp = root / "exp"
    exp.mkdir()
    for epoch in (1, 2):
        with torch.no_grad():  # different weights per epoch: the average is a real one
            next(model.parameters()).add_(0.01)
        torch.save({"model": model.state_dict(), "model_config": model.config.to_dict(),
                    "batch_idx_train": 10 * epoch, "cur_epoch": epoch}, exp / f"epoch-{epoch}.pt")
    return {**paths, "root": root, "exp": exp, "model": exp / "epoch-2.pt"}


def _temporaries(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if ".partial" in p.name)


def _run(argv: list[str], env: dict[str, str], spec: dict | None) -> subprocess.CompletedProcess:
    cmd = ([sys.executable, str(LAUNCHER), json.dumps(spec), *argv] if spec is not None
           else [str(BIN / "zipasr"), *argv])
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


def _kill_then_rerun(stage: Stage, tmp_path: Path) -> None:
    env = tool_env()
    env["TMPDIR"] = str(tmp_path / "systmp")  # a stage's scratch files must not pile up here
    Path(env["TMPDIR"]).mkdir()
    side_seen: dict[Path, bytes] = {}
    for spec in stage.kills:
        proc = _run(stage.argv, env, spec)
        what = f"killed at {spec} (exit {proc.returncode}):\n{proc.stderr[-2000:]}"
        present = [p for p in stage.outputs if p.exists()]
        assert not present, f"final outputs exist after the stage was {what}: {present}"
        assert proc.returncode == -signal.SIGKILL, f"not killed: the stage was to be {what}"
        assert _temporaries(stage.root), f"no temporary left by the stage {what}"
        side_seen.update({p: p.read_bytes() for p in stage.side if p.exists()})

    proc = _run(stage.argv, env, None)
    assert proc.returncode == 0, f"rerun failed:\n{proc.stderr[-3000:]}"
    assert all(p.exists() for p in stage.outputs), [p for p in stage.outputs if not p.exists()]
    stage.check(proc.stdout)
    for p, data in side_seen.items():  # a killed run's side file is never a partial one
        assert p.read_bytes() == data, f"{p} left by a killed run differs from the rerun's"
    assert not _temporaries(stage.root), "the rerun left (or kept) temporaries"
    assert not list(Path(env["TMPDIR"]).iterdir()), "scratch files left in $TMPDIR"


def test_fbank(inputs: dict[str, Path], tmp_path: Path) -> None:
    from lhotse import CutSet

    fbank = tmp_path / "data" / "fbank"
    cuts, feats = fbank / "x_cuts_dev.jsonl.gz", fbank / "x_feats_dev"
    summary = fbank / "x_summary_dev.json"

    def check(_: str) -> None:
        loaded = CutSet.from_file(cuts)
        assert len(loaded) == 4 == json.loads(summary.read_text())["cuts"]
        for c in loaded:
            assert Path(c.features.storage_path).parent == feats
            assert c.load_features().shape == (c.num_frames, 80)

    _kill_then_rerun(Stage(
        argv=["fbank", "--recordings", str(inputs["root"] / "recs_dev.jsonl.gz"),
              "--supervisions", str(inputs["root"] / "sups_dev.jsonl.gz"),
              "--out-cuts", str(cuts), "--storage-dir", str(feats), "--summary", str(summary),
              "--num-mel-bins", "80", "--num-jobs", "1"],
        root=tmp_path / "data", outputs=[cuts, feats, summary],
        kills=[{"write": "feats-0.lca", "after": 100},  # partway through the feature archive
               {"write": "_cuts_dev.jsonl.gz", "after": 20},  # partway through the manifest
               {"replace": feats.name}],  # at the first rename of the three
        check=check), tmp_path)


def test_bpe(inputs: dict[str, Path], tmp_path: Path) -> None:
    import sentencepiece as spm

    lang = tmp_path / "data" / f"lang_bpe_{VOCAB}"
    lang.mkdir(parents=True)  # Snakemake creates the outputs' directory before the job

    def check(_: str) -> None:
        sp = spm.SentencePieceProcessor(model_file=str(lang / "bpe.model"))
        tokens = (lang / "tokens.txt").read_text().splitlines()
        assert sp.get_piece_size() == VOCAB == len(tokens)
        assert tokens[0] == "<blk> 0"

    _kill_then_rerun(Stage(
        argv=["bpe", "--supervisions", str(inputs["root"] / "sups_train.jsonl.gz"),
              "--lang-dir", str(lang), "--vocab-size", str(VOCAB), "--model-type", "unigram",
              "--character-coverage", "1.0"],
        root=tmp_path / "data", outputs=[lang / "bpe.model", lang / "tokens.txt"],
        # tokens.txt is written after sentencepiece wrote bpe.model (C++, not interceptable)
        kills=[{"write": "tokens.txt", "after": 10},  # partway, bpe.model complete
               {"replace": lang.name}],  # the whole directory, at its rename
        check=check), tmp_path)


def test_average(inputs: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "exp" / f"{AVG}.pt"

    def check(_: str) -> None:
        avg = torch.load(out, weights_only=False)
        ends = [torch.load(inputs["exp"] / f"epoch-{e}.pt", weights_only=False)["model"]
                for e in (1, 2)]
        name = next(iter(ends[0]))
        torch.testing.assert_close(avg["model"][name], (ends[0][name] + ends[1][name]) / 2)

    _kill_then_rerun(Stage(
        argv=["average", "--exp-dir", str(inputs["exp"]), "--epoch", "2", "--avg", "2",
              "--no-use-averaged-model", "--out", str(out)],
        root=tmp_path / "exp", outputs=[out],
        kills=[{"write": out.name, "after": 4096, "torch_save": True},  # partway through
               {"replace": out.name}],
        check=check), tmp_path)


def test_decode(inputs: dict[str, Path], tmp_path: Path) -> None:
    result_dir = tmp_path / "exp" / "greedy_search"
    name = f"dev-greedy_search-{AVG}.txt"
    summary, recogs, errs = (result_dir / f"{k}-{name}" for k in ("wer-summary", "recogs", "errs"))

    def check(stdout: str) -> None:
        lines = summary.read_text().splitlines()
        assert lines[0] == "settings\tWER" and lines[1].startswith("greedy_search\t")
        assert recogs.read_text().count("\tref=") == 4
        assert errs.read_text().startswith("%WER = ")
        assert "WER" in stdout

    _kill_then_rerun(Stage(
        argv=["decode", "--model", str(inputs["model"]), "--bpe-model", str(inputs["bpe"]),
              "--cuts", str(inputs["dev"]), "--test-set", "dev", "--method", "greedy_search",
              "--max-duration", "300", "--num-threads", "1", "--device", "cpu",
              "--result-dir", str(result_dir), "--suffix", AVG],
        root=tmp_path / "exp", outputs=[summary],
        # wer-summary is written last: recogs and errs are final (and complete) at both kills
        kills=[{"write": "wer-summary-", "after": 5},  # partway through it
               {"replace": summary.name}],  # at its rename
        check=check, side=[recogs, errs]), tmp_path)


def test_wer_table(tmp_path: Path) -> None:
    summaries = []
    for part, wer in (("dev", "12.50"), ("test", "9.75")):
        p = tmp_path / "exp" / "greedy_search" / f"wer-summary-{part}-greedy_search-{AVG}.txt"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(f"settings\tWER\ngreedy_search\t{wer}\n")
        summaries.append(str(p))
    table = tmp_path / "exp" / "wer.tsv"

    def check(stdout: str) -> None:
        text = table.read_text()
        assert text == stdout and text.startswith("test_set\t")
        assert "12.50" in text and "9.75" in text

    _kill_then_rerun(Stage(
        argv=["wer-table", *summaries, "--out", str(table)],
        root=tmp_path / "exp", outputs=[table],
        kills=[{"write": table.name, "after": 5}, {"replace": table.name}],
        check=check), tmp_path)


def test_only_dead_writers_temporaries_are_removed(tmp_path: Path) -> None:
    """The rerun's sweep must not break a live writer of the same name (e.g. two processes
    updating one metadata file): only a dead process's temporaries on this host go."""
    from zipasr.io import _HOST, remove_stale_temporaries

    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    dead = int(done.stdout)  # reaped: no process has this id (until the pid wraps around)
    final = tmp_path / "wer.tsv"
    names = {"dead": f".wer.tsv.{_HOST}.{dead}.abcd1234.partial.tsv",
             "live": f".wer.tsv.{_HOST}.{os.getpid()}.abcd1234.partial.tsv",
             "other_host": f".wer.tsv.{_HOST}x.{dead}.abcd1234.partial.tsv",
             "other_name": f".wer.tsv2.{_HOST}.{dead}.abcd1234.partial.tsv"}
    for name in names.values():
        (tmp_path / name).write_text("x")
    assert remove_stale_temporaries(final) == [tmp_path / names["dead"]]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        n for k, n in names.items() if k != "dead")
