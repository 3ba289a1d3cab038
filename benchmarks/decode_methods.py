"""Every decoding method on a trained model, side by side: WER and real-time factor on the
same cut manifests, in one process, methods round-robin so load hits them alike.

    .venv/bin/python benchmarks/decode_methods.py \
        --model exp/synth-demo/epoch-2_avg-1_use-averaged-model.pt \
        --bpe-model data/lang_bpe_1000/bpe.model --lm-dir data/lm_bpe_1000 \
        --cuts data/fbank/synth_cuts_dev.jsonl.gz data/fbank/synth_cuts_test.jsonl.gz \
        [--lm-scale 0.3 --lodr-scale -0.24 --beam 4 --reps 2 --threads 1]

RTF = wall time of ``decode_cuts`` (features read, encoder, search) / audio seconds; the
median over ``--reps`` rounds; "vs greedy" divides by greedy search's RTF of the same round
set. WER is the same in every round (decoding is deterministic).
"""

from __future__ import annotations

import argparse
import os
import statistics
from pathlib import Path

import torch

from zipasr.decode.driver import decode_cuts, search_key
from zipasr.decode.fusion import Fusion
from zipasr.decode.model import load_model
from zipasr.decode.names import LM_METHODS, METHODS
from zipasr.decode.scoring import error_stats


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--bpe-model", type=Path, required=True)
    p.add_argument("--lm-dir", type=Path, required=True, help="lm.pt and bigram.arpa")
    p.add_argument("--cuts", type=Path, nargs="+", required=True)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--beam", type=int, default=4)
    p.add_argument("--lm-scale", type=float, default=0.3)
    p.add_argument("--lodr-scale", type=float, default=-0.24)
    p.add_argument("--max-duration", type=float, default=300.0)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()

    import sentencepiece as spm
    from lhotse import CutSet

    from zipasr.lm.bigram import read_arpa
    from zipasr.lm.model import load_rnn_lm

    torch.set_num_threads(args.threads)
    sp = spm.SentencePieceProcessor(model_file=str(args.bpe_model))
    model = load_model(args.model)
    lm = load_rnn_lm(args.lm_dir / "lm.pt")
    bigram = read_arpa(args.lm_dir / "bigram.arpa", sp)
    fusions = {
        "modified_beam_search_lm_shallow_fusion": Fusion(lm=lm, lm_scale=args.lm_scale),
        "modified_beam_search_LODR": Fusion(lm=lm, lm_scale=args.lm_scale, bigram=bigram,
                                            lodr_scale=args.lodr_scale),
    }
    sets = {path.name: CutSet.from_file(path).to_eager() for path in args.cuts}
    rtf: dict[tuple[str, str], list[float]] = {}
    wer: dict[tuple[str, str], float] = {}
    for _ in range(args.reps):
        for name, cuts in sets.items():
            for method in args.methods:
                fusion = fusions.get(method) if method in LM_METHODS else None
                results, audio, wall = decode_cuts(model, sp, cuts, method=method,
                                                   beam=args.beam,
                                                   max_duration=args.max_duration,
                                                   fusion=fusion)
                rtf.setdefault((name, method), []).append(wall / audio)
                wer[(name, method)] = error_stats(results).wer
    load = os.getloadavg()[0]
    print(f"threads {args.threads}, {args.reps} rounds, load average {load:.2f} at the end\n")
    print("| set | method (result key) | WER % | RTF (median) | vs greedy |")
    print("|---|---|---:|---:|---:|")
    for name in sets:
        greedy = statistics.median(rtf.get((name, "greedy_search"), [float("nan")]))
        for method in args.methods:
            r = statistics.median(rtf[(name, method)])
            key = search_key(method, args.beam, fusion=fusions.get(method))
            print(f"| {name} | {key} | {wer[(name, method)]:.2f} | {r:.4f} | "
                  f"{r / greedy:.2f}x |")


if __name__ == "__main__":
    main()
