"""``zipasr model-info``: build a preset, optionally load an icefall checkpoint strictly, and
print parameter counts per component."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def load_checkpoint(model: Any, path: str | Path) -> None:
    """Load icefall's ``{"model": state_dict}`` (pretrained.pt / epoch-N.pt) or a bare state
    dict, strictly. A DDP ``module.`` prefix is stripped."""
    from zipasr.train.checkpoint import load_checkpoint as read_checkpoint

    ckpt = read_checkpoint(path, required=())
    state = ckpt.get("model", ckpt)
    state = {k.removeprefix("module."): v for k, v in state.items()}
    model.load_state_dict(state, strict=True)


def format_counts(counts: dict[str, int]) -> str:
    width = max(len(k) for k in counts)
    return "\n".join(f"{name:<{width}}  {n:>12,}" for name, n in counts.items())


def _run(args: argparse.Namespace) -> int:
    from zipasr.errors import ZipasrError
    from zipasr.model.transducer import Transducer

    overrides: dict[str, Any] = {}
    if args.use_ctc:
        overrides["use_ctc"] = True
    try:
        model = Transducer.from_preset(args.preset, vocab_size=args.vocab_size,
                                       causal=args.causal, **overrides)
    except KeyError as e:
        raise ZipasrError(str(e.args[0])) from e
    if args.checkpoint:
        try:
            load_checkpoint(model, args.checkpoint)
        except (RuntimeError, KeyError, FileNotFoundError) as e:
            raise ZipasrError(f"cannot load {args.checkpoint}: {e}") from e
    c = model.config
    print(f"preset {args.preset}: encoder_dim {','.join(map(str, c.encoder_dim))}, "
          f"layers {','.join(map(str, c.num_encoder_layers))}, vocab {c.vocab_size}, "
          f"causal {c.causal}" + (f", loaded {args.checkpoint}" if args.checkpoint else ""))
    print(format_counts(model.num_params_by_component()))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "model-info", help="build a Zipformer preset and print its parameter counts",
        description=__doc__,
    )
    p.add_argument("--preset", default="M", help="S, M, L, demo or xs (default M)")
    p.add_argument("--vocab-size", type=int, default=500)
    p.add_argument("--causal", action="store_true", help="streaming (chunk-causal) variant")
    p.add_argument("--use-ctc", action="store_true", help="add the CTC head")
    p.add_argument("--checkpoint", help="icefall checkpoint ({'model': state_dict}) to load")
    p.set_defaults(func=_run)
