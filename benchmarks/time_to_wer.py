"""WER against wall time of a `make run`: every checkpoint the training wrote, decoded with
greedy search on the test set, at the time it was written (seconds since the run started).

Run the DAG keeping every checkpoint (the numbers do not depend on it), then this script in
the run's directory:

    echo 'train: {keep_last_k: 100}' > keep.yaml
    make run CONFIG=keep.yaml                       # or: snakemake --cores 2 --configfile keep.yaml
    .venv/bin/python benchmarks/time_to_wer.py --run-dir . [--exp-dir exp/synth-demo]

The start of the run is the first Snakemake log's time stamp in ``.snakemake/log/`` (or
``--start``, ISO time); a checkpoint's time is its file's modification time. At each
``checkpoint-B.pt`` the model decoded is what `zipasr average --iter B --avg A
--use-averaged-model` gives (the running average over the last ``--avg`` checkpoint intervals,
fewer at the start): the raw weights of a checkpoint are far worse than the averaged model
`make run` decodes (17-20 % against 9.2 % on the 2026-12-06 default). The run's own averaged
model (what the WER table holds) is the last row. ``--cuts`` of another part (dev) gives the
curve that recipe choices are made on.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import re
from pathlib import Path

import torch


def run_start(run_dir: Path, start: str | None) -> float:
    if start is not None:
        return dt.datetime.fromisoformat(start).timestamp()
    logs = sorted((run_dir / ".snakemake" / "log").glob("*.snakemake.log"))
    if not logs:
        raise SystemExit(f"no Snakemake log in {run_dir}/.snakemake/log: give --start")
    stamp = logs[0].name.split(".snakemake.log")[0]  # 2026-12-07T034143.840613
    return dt.datetime.strptime(stamp, "%Y-%m-%dT%H%M%S.%f").timestamp()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run-dir", type=Path, default=Path("."))
    p.add_argument("--exp-dir", type=Path, default=Path("exp/synth-demo"))
    p.add_argument("--cuts", type=Path, default=Path("data/fbank/synth_cuts_test.jsonl.gz"))
    p.add_argument("--bpe-model", type=Path, default=Path("data/lang_bpe_1000/bpe.model"))
    p.add_argument("--start", default=None, help="ISO time the run started")
    p.add_argument("--avg", type=int, default=5, help="checkpoint intervals averaged")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()

    import tempfile

    import sentencepiece as spm
    from lhotse import CutSet

    from zipasr.decode.average import average_exp_dir
    from zipasr.decode.driver import decode_cuts
    from zipasr.decode.model import load_model
    from zipasr.decode.scoring import error_stats

    torch.set_num_threads(args.threads)
    os.chdir(args.run_dir)  # the manifests' feature paths are relative to it
    t0 = run_start(Path("."), args.start)
    exp = args.exp_dir
    sp = spm.SentencePieceProcessor(model_file=str(args.bpe_model))
    cuts = CutSet.from_file(args.cuts).to_eager()

    def batch_of(path: Path) -> int:
        m = re.fullmatch(r"checkpoint-(\d+)\.pt", path.name)
        return int(m.group(1)) if m else 10**9

    files = sorted(exp.glob("checkpoint-*.pt"), key=batch_of)
    # the DAG's averaged model: epoch-E_avg-A[...].pt or epoch-E_last-N-batches[...].pt
    averaged = sorted(exp.glob("epoch-*_*.pt"), key=lambda f: f.stat().st_mtime)
    rows = []
    tmp = Path(tempfile.mkdtemp()) / "averaged.pt"
    for i, f in enumerate(files + averaged[-1:]):
        if i < len(files):  # zipasr average --iter B --avg k --use-averaged-model
            k = min(args.avg, i)
            if k == 0:
                continue  # nothing older to average with
            sd, info = average_exp_dir(exp, iteration=batch_of(f), avg=k,
                                       use_averaged_model=True)
            torch.save({"model": sd, "model_config": info["model_config"]}, tmp)
            model = load_model(tmp)
        else:
            model = load_model(f)
        results, _, _ = decode_cuts(model, sp, cuts, method="greedy_search")
        minutes = (f.stat().st_mtime - t0) / 60
        rows.append((f.name, minutes, error_stats(results).wer))
        print(f"{f.name}\t{minutes:.1f} min\t{rows[-1][2]:.2f} %", flush=True)
    print("\n| checkpoint | minutes since the run started | test WER % (greedy) |")
    print("|---|---:|---:|")
    for name, minutes, wer in rows:
        print(f"| {name} | {minutes:.1f} | {wer:.2f} |")


if __name__ == "__main__":
    main()
