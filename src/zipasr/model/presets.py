"""Named model sizes. S/M/L are icefall's LibriSpeech recipes (RESULTS.md); ``xs`` is a
tiny model for unit tests and ``demo`` a ~4 M-parameter model that trains on a 2-core CPU.

Each preset is a dict of :class:`~zipasr.model.config.ZipformerConfig` fields; fields not
given take the config defaults (icefall's, e.g. query_head_dim 32, pos_dim 48).
"""

from __future__ import annotations

from typing import Any

PRESETS: dict[str, dict[str, Any]] = {
    # 23,285,615 parameters with vocab 500
    "S": dict(
        num_encoder_layers=(2, 2, 2, 2, 2, 2),
        feedforward_dim=(512, 768, 768, 768, 768, 768),
        encoder_dim=(192, 256, 256, 256, 256, 256),
        encoder_unmasked_dim=(192, 192, 192, 192, 192, 192),
    ),
    # 65,549,011 parameters with vocab 500 (icefall's default model)
    "M": dict(
        num_encoder_layers=(2, 2, 3, 4, 3, 2),
        feedforward_dim=(512, 768, 1024, 1536, 1024, 768),
        encoder_dim=(192, 256, 384, 512, 384, 256),
        encoder_unmasked_dim=(192, 192, 256, 256, 256, 192),
    ),
    # 148,439,574 parameters with vocab 500
    "L": dict(
        num_encoder_layers=(2, 2, 4, 5, 4, 2),
        feedforward_dim=(512, 768, 1536, 2048, 1536, 768),
        encoder_dim=(192, 256, 512, 768, 512, 256),
        encoder_unmasked_dim=(192, 192, 256, 320, 256, 192),
    ),
    # CPU demo (3.7 M parameters with vocab 500): the six-stack shape at small width, one
    # layer per stack, and a narrow Conv-Embed (its 128-channel ConvNeXt at 50 Hz would take
    # 60% of a CPU training step at this size; 32 channels train ~12% faster than 48 and
    # reached a lower WER in the same 20 minutes, BENCHMARKS.md).
    "demo": dict(
        embed_channels=(4, 8, 32),
        num_encoder_layers=(1, 1, 1, 1, 1, 1),
        feedforward_dim=(256, 320, 384, 448, 384, 320),
        encoder_dim=(96, 128, 144, 160, 144, 128),
        encoder_unmasked_dim=(96, 96, 112, 128, 112, 96),
        num_heads=(4, 4, 4, 4, 4, 4),
        query_head_dim=(24,),
        cnn_module_kernel=(31, 31, 15, 15, 15, 31),
        decoder_dim=256,
        joiner_dim=256,
    ),
    # Unit tests: every structural feature (six stacks, widths that truncate and pad,
    # combination from three stacks) at toy size.
    "xs": dict(
        num_encoder_layers=(1, 1, 1, 2, 1, 1),
        feedforward_dim=(48, 64, 96, 96, 64, 48),
        encoder_dim=(32, 48, 64, 64, 48, 32),
        encoder_unmasked_dim=(24, 32, 48, 48, 32, 24),
        num_heads=(2, 2, 2, 4, 2, 2),
        query_head_dim=(8,),
        value_head_dim=(4,),
        pos_head_dim=(2,),
        pos_dim=16,
        cnn_module_kernel=(7, 7, 5, 5, 5, 7),
        decoder_dim=32,
        joiner_dim=32,
        vocab_size=40,
    ),
}


def list_presets() -> list[str]:
    return list(PRESETS)
