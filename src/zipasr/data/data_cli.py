"""Subcommands of the data stages: ``download-librispeech``, ``prepare-librispeech``, ``fbank``."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("download-librispeech",
                       help="download and extract one LibriSpeech part from a mirror")
    p.add_argument("--target-dir", type=Path, required=True)
    p.add_argument("--part", required=True, help="e.g. train-clean-5, dev-clean-2, test-clean")
    p.add_argument("--base-url", default="http://www.openslr.org/resources",
                   help="mirror root holding 12/{part}.tar.gz and 31/{part}.tar.gz")
    p.add_argument("--keep-archive", action="store_true", help="keep the .tar.gz after extracting")
    p.set_defaults(func=_download)

    p = sub.add_parser("prepare-librispeech", help="lhotse manifests for one LibriSpeech part")
    p.add_argument("--corpus-dir", type=Path, required=True, help="the LibriSpeech directory")
    p.add_argument("--part", required=True)
    p.add_argument("--manifest-dir", type=Path, required=True)
    p.add_argument("--prefix", default="librispeech")
    p.add_argument("--strict", action="store_true", help="fail on the first bad utterance")
    p.set_defaults(func=_prepare)

    p = sub.add_parser("fbank", help="cuts + speed perturbation + fbank features for one part")
    p.add_argument("--recordings", type=Path, required=True)
    p.add_argument("--supervisions", type=Path, required=True)
    p.add_argument("--out-cuts", type=Path, required=True)
    p.add_argument("--storage-dir", type=Path, required=True)
    p.add_argument("--num-mel-bins", type=int, default=80)
    p.add_argument("--frame-shift", type=float, default=0.01)
    p.add_argument("--dither", type=float, default=0.0)
    p.add_argument("--speed-perturb", type=float, nargs="*", default=[],
                   help="factors, e.g. 0.9 1.1 (the original is always kept)")
    p.add_argument("--num-jobs", type=int, default=1)
    p.add_argument("--strict", action="store_true")
    p.add_argument("--summary", type=Path, help="write counts, hours and RTF as JSON here")
    p.add_argument("--no-features", dest="features", action="store_false",
                   help="write the cuts (speed-perturbed copies included) with their audio only "
                        "and an empty --storage-dir: training computes the features on the fly "
                        "(zipasr train --on-the-fly-features)")
    p.set_defaults(func=_fbank)


def _download(args: argparse.Namespace) -> int:
    from zipasr.data.librispeech import download_part

    download_part(args.target_dir, args.part, args.base_url, keep_archive=args.keep_archive)
    return 0


def _prepare(args: argparse.Namespace) -> int:
    from zipasr.data.librispeech import prepare_part

    prepare_part(args.corpus_dir, args.part, args.manifest_dir, prefix=args.prefix,
                 strict=args.strict)
    return 0


def _fbank(args: argparse.Namespace) -> int:
    from zipasr.data.fbank import FbankOptions, compute_fbank

    opts = FbankOptions(num_mel_bins=args.num_mel_bins, frame_shift=args.frame_shift,
                        dither=args.dither, speed_perturb=list(args.speed_perturb),
                        num_jobs=args.num_jobs, strict=args.strict, features=args.features)
    # the summary is committed with the cuts and features, so they appear together
    compute_fbank(args.recordings, args.supervisions, args.out_cuts, args.storage_dir, opts,
                  what=f"fbank {args.out_cuts.name}", summary_path=args.summary)
    return 0
