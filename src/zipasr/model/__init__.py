"""The Zipformer transducer (icefall's ``egs/librispeech/ASR/zipformer``), without k2.

    from zipasr.model import Transducer, set_batch_count
    model = Transducer.from_preset("M", vocab_size=500)
    model.load_state_dict(torch.load("pretrained.pt")["model"])  # icefall checkpoint
    encoder_out, encoder_out_lens = model.forward_encoder(x, x_lens)

Names are imported on first use: ``zipasr.model.config`` (the dimensions, what the workflow
and the CLI's argument parsing need) loads without torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "PRESETS": "presets",
    "ZipformerConfig": "config",
    "Decoder": "decoder",
    "Joiner": "joiner",
    "Conv2dSubsampling": "subsampling",
    "Transducer": "transducer",
    "make_pad_mask": "transducer",
    "set_batch_count": "transducer",
    "Zipformer2": "zipformer",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
