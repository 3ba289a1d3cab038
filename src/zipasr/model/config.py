"""ZipformerConfig: every dimension of the Zipformer transducer in one dataclass.

Field names are icefall's ``train.py`` model arguments (``--encoder-dim`` ->
``encoder_dim``), so a recipe's flags map one to one. Per-stack fields are tuples with
one entry per stack (6 for the paper's models); a comma string "2,2,3,4,3,2" or a list is
accepted too.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from zipasr.config import check_fields
from zipasr.errors import ZipasrError

PerStack = tuple[int, ...]


def _per_stack(value: Any) -> PerStack:
    if isinstance(value, int):
        return (value,)
    if isinstance(value, str):
        return tuple(int(v) for v in value.split(",") if v.strip())
    return tuple(int(v) for v in value)


@dataclass
class ZipformerConfig:
    """Dimensions of Conv-Embed + Zipformer2 + stateless decoder + joiner.

    Defaults are icefall's Zipformer-M (65.5 M parameters with vocab_size 500).
    """

    # input features (80-dim fbank at 100 Hz)
    feature_dim: int = 80
    # Conv-Embed channels of its three conv layers (icefall: 8, 32, 128; the ConvNeXt runs at
    # the last width and 100/2 Hz, which dominates the cost of small models on a CPU)
    embed_channels: PerStack = (8, 32, 128)
    # encoder stacks (one entry per stack; downsampling relative to the 50 Hz embed)
    downsampling_factor: PerStack = (1, 2, 4, 8, 4, 2)
    num_encoder_layers: PerStack = (2, 2, 3, 4, 3, 2)
    feedforward_dim: PerStack = (512, 768, 1024, 1536, 1024, 768)
    encoder_dim: PerStack = (192, 256, 384, 512, 384, 256)
    encoder_unmasked_dim: PerStack = (192, 192, 256, 256, 256, 192)
    num_heads: PerStack = (4, 4, 4, 8, 4, 4)
    cnn_module_kernel: PerStack = (31, 31, 15, 15, 15, 31)
    query_head_dim: PerStack = (32,)
    value_head_dim: PerStack = (12,)
    pos_head_dim: PerStack = (4,)
    pos_dim: int = 48
    # streaming: chunk sizes / left contexts (50 Hz frames) drawn per batch when causal
    causal: bool = False
    chunk_size: PerStack = (16, 32, 64, -1)
    left_context_frames: PerStack = (64, 128, 256, -1)
    # transducer heads
    vocab_size: int = 500
    blank_id: int = 0
    decoder_dim: int = 512
    joiner_dim: int = 512
    context_size: int = 2
    use_transducer: bool = True
    use_ctc: bool = False
    # schedule lengths (in ref-duration-adjusted batches)
    warmup_batches: float = 4000.0

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            if f.type in ("PerStack", PerStack):
                setattr(self, f.name, _per_stack(getattr(self, f.name)))
        n = len(self.downsampling_factor)
        for name in ("num_encoder_layers", "feedforward_dim", "encoder_dim",
                     "encoder_unmasked_dim", "num_heads", "cnn_module_kernel",
                     "query_head_dim", "value_head_dim", "pos_head_dim"):
            v = getattr(self, name)
            if len(v) not in (1, n):
                raise ValueError(f"{name} has {len(v)} entries, expected 1 or {n}")
        if self.use_transducer is False and self.use_ctc is False:
            raise ValueError("at least one of use_transducer, use_ctc must be true")
        if self.causal:
            self._check_chunks()

    def _check_chunks(self) -> None:
        """Every (chunk_size, left_context_frames) pair a causal model can draw must be one
        icefall's Zipformer2 accepts; otherwise training stops at an assert inside some later
        forward, on whichever batch first draws the bad pair."""
        ds = self.downsampling_factor
        kernel = self.cnn_module_kernel * (len(ds) if len(self.cnn_module_kernel) == 1 else 1)
        if not self.chunk_size or not self.left_context_frames:
            raise ValueError("a causal model needs at least one chunk_size and one "
                             "left_context_frames entry (-1: whole utterance / unlimited)")
        for c in self.chunk_size:
            # the downsampled stacks run at chunk_size // ds and see mask[::ds, ::ds]
            bad = sorted({d for d in ds if c % d}) if c > 0 else []
            if c != -1 and (c <= 0 or bad):
                why = f"not a multiple of {bad}" if bad else "not positive"
                raise ValueError(
                    f"chunk_size {c} is {why}: each entry must be -1 or a positive multiple "
                    f"of every downsampling_factor {list(ds)}")
        for left in self.left_context_frames:
            if left != -1 and left <= 0:
                raise ValueError(f"left_context_frames {left}: each entry must be -1 "
                                 "(unlimited) or positive")
        # The chunk-causal convolution of stack i looks back (K_i // 2) frames at its rate,
        # (K_i // 2) * ds_i frames at 50 Hz; the attention's left context must cover them
        # (icefall's Zipformer2._get_attn_mask asserts it). left -1 is unlimited.
        for c in self.chunk_size:
            if c == -1:
                continue  # no chunking: no left context is drawn
            for left in self.left_context_frames:
                if left == -1:
                    continue
                chunks = max(1, left // c)
                for i, (k, d) in enumerate(zip(kernel, ds, strict=True)):
                    if c * chunks < (k // 2) * d:
                        raise ValueError(
                            f"chunk_size {c} with left_context_frames {left} gives "
                            f"{c} * max(1, {left} // {c}) = {c * chunks} frames of left "
                            f"context, fewer than stack {i} needs: (cnn_module_kernel {k} "
                            f"// 2) * downsampling_factor {d} = {(k // 2) * d}; icefall's "
                            "constraint is chunk_size * max(1, left_context_frames // "
                            "chunk_size) >= (cnn_module_kernel // 2) * downsampling_factor "
                            "for every stack")

    @property
    def output_dim(self) -> int:
        """Encoder output width: max(encoder_dim)."""
        return max(self.encoder_dim)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> ZipformerConfig:
        """A named preset (see :mod:`zipasr.model.presets`) with keyword overrides."""
        from .presets import PRESETS

        key = name if name in PRESETS else name.upper() if name.upper() in PRESETS else None
        if key is None:
            raise KeyError(f"unknown model preset {name!r}; known: {', '.join(PRESETS)}")
        return cls(**{**PRESETS[key], **overrides})

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ZipformerConfig:
        """From a config mapping, e.g. the ``model:`` section of the project config.

        An optional ``preset`` key names the starting point; other keys override it.
        Unknown keys raise (typos should not silently fall back to defaults).
        """
        d = dict(d)
        preset = d.pop("preset", None)
        check_fields(cls, d, "unknown model config keys", KeyError)
        if preset is not None:
            return cls.from_preset(preset, **d)
        return cls(**d)


def check_chunking(config: Any, chunk_size: int, left_context_frames: int) -> None:
    """ZipasrError unless a model of ``config`` (a ZipformerConfig) can decode with chunks of
    ``chunk_size`` frames and ``left_context_frames`` of left context.

    Chunks must split evenly into every stack's frame rate; the left context must be whole
    chunks (what the chunk mask of the simulation can express) and cover every convolution's
    left half-kernel (icefall's condition ``chunk * left_chunks >= (kernel // 2) * ds``)."""
    if not config.causal:
        raise ZipasrError("streaming decoding needs a causal model (model.causal: true); this "
                          "one sees the whole utterance")
    ds = tuple(config.downsampling_factor)
    if chunk_size <= 0 or any(chunk_size % d for d in ds):
        raise ZipasrError(f"chunk size {chunk_size}: must be a positive multiple of every "
                          f"downsampling factor {ds} (e.g. {max(ds) * 2})")
    if left_context_frames <= 0 or left_context_frames % chunk_size:
        raise ZipasrError(f"left context {left_context_frames} frames: must be a positive "
                          f"multiple of the chunk size {chunk_size}")
    kernels = config.cnn_module_kernel
    kernels = kernels * len(ds) if len(kernels) == 1 else kernels
    need = max((k // 2) * d for k, d in zip(kernels, ds, strict=True))
    if left_context_frames < need:
        raise ZipasrError(f"left context {left_context_frames} frames is shorter than the "
                          f"convolutions' left context ({need} frames: kernel // 2 x "
                          "downsampling factor of some stack)")
