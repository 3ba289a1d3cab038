"""Subcommands of the data stages: ``download-librispeech``, ``prepare-librispeech``, ``fbank``;
a part's fbank in pieces, ``split-manifests`` and ``gather-cuts``; MUSAN noise,
``download-musan``, ``prepare-musan`` and ``fbank-musan``."""

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

    p = sub.add_parser("split-manifests",
                       help="a part's recordings and supervisions in N pieces, by recording")
    p.add_argument("--recordings", type=Path, required=True)
    p.add_argument("--supervisions", type=Path, required=True)
    p.add_argument("--num-splits", type=int, required=True)
    p.add_argument("--out-dir", type=Path, required=True,
                   help="writes {prefix}_{recordings,supervisions}_{part}.{i}.jsonl.gz here")
    p.add_argument("--prefix", required=True)
    p.add_argument("--part", required=True)
    p.set_defaults(func=_split)

    p = sub.add_parser("gather-cuts",
                       help="join the pieces' cut manifests of a part (in an unsplit run's order)")
    p.add_argument("--cuts", type=Path, nargs="+", required=True, help="in piece order")
    p.add_argument("--out-cuts", type=Path, required=True)
    p.add_argument("--storage-dir", type=Path, required=True,
                   help="the part's feature directory: the pieces' feature files linked here")
    p.add_argument("--summaries", type=Path, nargs="*", default=[],
                   help="the pieces' fbank summaries, summed into --summary")
    p.add_argument("--summary", type=Path)
    p.set_defaults(func=_gather)

    p = sub.add_parser("download-musan", help="download and extract MUSAN from a mirror")
    p.add_argument("--target-dir", type=Path, required=True, help="extracts to TARGET_DIR/musan")
    p.add_argument("--base-url", default="http://www.openslr.org/resources",
                   help="mirror root holding 17/musan.tar.gz")
    p.add_argument("--keep-archive", action="store_true", help="keep the .tar.gz after extracting")
    p.set_defaults(func=_download_musan)

    p = sub.add_parser("prepare-musan", help="lhotse manifests of MUSAN's music, speech, noise")
    p.add_argument("--corpus-dir", type=Path, required=True, help="the musan directory")
    p.add_argument("--manifest-dir", type=Path, required=True)
    p.set_defaults(func=_prepare_musan)

    p = sub.add_parser("fbank-musan",
                       help="MUSAN noise cuts (10 s windows, > 5 s) with fbank, as icefall's")
    p.add_argument("--recordings", type=Path, nargs="+", required=True)
    p.add_argument("--out-cuts", type=Path, required=True)
    p.add_argument("--storage-dir", type=Path, required=True)
    p.add_argument("--summary", type=Path)
    p.add_argument("--num-mel-bins", type=int, default=80)
    p.add_argument("--frame-shift", type=float, default=0.01)
    p.add_argument("--dither", type=float, default=0.0)
    p.add_argument("--num-jobs", type=int, default=1)
    p.add_argument("--window", type=float, default=10.0, help="seconds per noise cut")
    p.add_argument("--min-duration", type=float, default=5.0,
                   help="windows this long or shorter are dropped")
    p.set_defaults(func=_fbank_musan)


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


def _split(args: argparse.Namespace) -> int:
    from zipasr.data.shards import split_manifests

    split_manifests(args.recordings, args.supervisions, args.num_splits, args.out_dir,
                    prefix=args.prefix, part=args.part)
    return 0


def _gather(args: argparse.Namespace) -> int:
    from zipasr.data.shards import gather_cuts

    gather_cuts(args.cuts, args.out_cuts, args.storage_dir, summary_paths=args.summaries,
                summary_path=args.summary)
    return 0


def _download_musan(args: argparse.Namespace) -> int:
    from zipasr.data.musan import download_musan

    download_musan(args.target_dir, args.base_url, keep_archive=args.keep_archive)
    return 0


def _prepare_musan(args: argparse.Namespace) -> int:
    from zipasr.data.musan import prepare_musan

    prepare_musan(args.corpus_dir, args.manifest_dir)
    return 0


def _fbank_musan(args: argparse.Namespace) -> int:
    from zipasr.data.musan import compute_musan_fbank

    compute_musan_fbank(args.recordings, args.out_cuts, args.storage_dir,
                        num_mel_bins=args.num_mel_bins, frame_shift=args.frame_shift,
                        dither=args.dither, num_jobs=args.num_jobs, window=args.window,
                        min_duration=args.min_duration, summary_path=args.summary)
    return 0
