"""The Zipformer transducer: Conv-Embed + Zipformer2 encoder + stateless decoder + joiner,
with the "simple" projections of the pruned RNN-T loss and an optional CTC head.

Module and parameter names are those of icefall's ``AsrModel``, so
``model.load_state_dict(torch.load("pretrained.pt")["model"])`` works strictly.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

from .config import ZipformerConfig
from .decoder import Decoder
from .joiner import Joiner
from .scaling import ScaledLinear, ScheduledFloat, at_least_f32
from .subsampling import Conv2dSubsampling
from .zipformer import Zipformer2


def make_pad_mask(lengths: Tensor, max_len: int | None = None) -> Tensor:
    """(N,) lengths -> (N, max_len) bool, True at padding positions (index >= length)."""
    max_len = int(lengths.max()) if max_len is None else max_len
    return torch.arange(max_len, device=lengths.device).unsqueeze(0) >= lengths.unsqueeze(1)


def set_batch_count(model: nn.Module, batch_count: float) -> None:
    """Write ``batch_count`` into every sub-module that has that attribute (all
    ScheduledFloats), and ``name`` into those that have a ``name``, like icefall's
    train.py. Call it every few batches with the ref_duration-adjusted batch count."""
    if hasattr(model, "module"):  # DDP wrapper
        model = model.module
    for name, module in model.named_modules():
        if hasattr(module, "batch_count"):
            module.batch_count = batch_count
        if hasattr(module, "name"):
            module.name = name


def _as_padded(y: Any, blank_id: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Token sequences as (y_padded (N, S) int64 padded with 0, y_lens (N,))."""
    if isinstance(y, tuple):
        y_padded, y_lens = y
        return y_padded.to(device=device, dtype=torch.int64), y_lens.to(device)
    seqs: Sequence[Sequence[int]] = y
    y_lens = torch.tensor([len(s) for s in seqs], dtype=torch.int64)
    y_padded = torch.zeros(len(seqs), max(1, int(y_lens.max())), dtype=torch.int64)
    for i, s in enumerate(seqs):
        y_padded[i, : len(s)] = torch.as_tensor(list(s), dtype=torch.int64)
    return y_padded.to(device), y_lens.to(device)


class Transducer(nn.Module):
    """icefall's ``AsrModel`` for the Zipformer recipe.

    Submodules (= state-dict prefixes): ``encoder_embed`` (Conv2dSubsampling),
    ``encoder`` (Zipformer2), and with ``use_transducer``: ``decoder``, ``joiner``,
    ``simple_am_proj``, ``simple_lm_proj``; with ``use_ctc``: ``ctc_output``
    (Dropout, Linear, LogSoftmax).
    """

    def __init__(self, config: ZipformerConfig):
        super().__init__()
        c = self.config = config
        dropout = ScheduledFloat((0.0, 0.3), (20000.0, 0.1))
        self.encoder_embed = Conv2dSubsampling(
            in_channels=c.feature_dim, out_channels=c.encoder_dim[0], dropout=dropout,
            layer1_channels=c.embed_channels[0], layer2_channels=c.embed_channels[1],
            layer3_channels=c.embed_channels[2],
        )
        self.encoder = Zipformer2(c)
        encoder_dim = c.output_dim
        self.use_transducer = c.use_transducer
        if c.use_transducer:
            self.decoder = Decoder(c.vocab_size, c.decoder_dim, c.blank_id, c.context_size)
            self.joiner = Joiner(encoder_dim, c.decoder_dim, c.joiner_dim, c.vocab_size)
            self.simple_am_proj = ScaledLinear(encoder_dim, c.vocab_size, initial_scale=0.25)
            self.simple_lm_proj = ScaledLinear(c.decoder_dim, c.vocab_size, initial_scale=0.25)
        self.use_ctc = c.use_ctc
        if c.use_ctc:
            self.ctc_output = nn.Sequential(
                nn.Dropout(p=0.1), nn.Linear(encoder_dim, c.vocab_size), nn.LogSoftmax(dim=-1)
            )

    # -- construction ------------------------------------------------------------------

    @classmethod
    def from_preset(cls, name: str, vocab_size: int = 500, causal: bool = False,
                    **overrides: Any) -> Transducer:
        """E.g. ``Transducer.from_preset("M", vocab_size=500)``; presets S, M, L, demo, xs."""
        return cls(ZipformerConfig.from_preset(name, vocab_size=vocab_size, causal=causal,
                                               **overrides))

    @classmethod
    def from_config(cls, config: ZipformerConfig | dict[str, Any]) -> Transducer:
        """From a ZipformerConfig or a mapping such as ``{"preset": "M", "vocab_size": 500}``."""
        if not isinstance(config, ZipformerConfig):
            config = ZipformerConfig.from_dict(config)
        return cls(config)

    # -- encoder -----------------------------------------------------------------------

    def forward_encoder(self, x: Tensor, x_lens: Tensor) -> tuple[Tensor, Tensor]:
        """x: (N, T, 80) fbank, x_lens: (N,) -> encoder_out (N, T', C), lengths (N,),
        T' = ((T - 7) // 2 + 1) // 2, C = max(encoder_dim)."""
        x, x_lens = self.encoder_embed(x, x_lens)
        src_key_padding_mask = make_pad_mask(x_lens, x.shape[1])
        x = x.permute(1, 0, 2)  # (T, N, C)
        encoder_out, encoder_out_lens = self.encoder(x, x_lens, src_key_padding_mask)
        encoder_out = encoder_out.permute(1, 0, 2)
        assert torch.all(encoder_out_lens > 0), (x_lens, encoder_out_lens)
        return encoder_out, encoder_out_lens

    def get_init_states(self, batch_size: int = 1, device: torch.device | None = None
                        ) -> list[Tensor]:
        """Streaming states: the encoder layers' caches, the embed's ConvNeXt cache, and
        the number of frames processed so far (N,)."""
        return self.encoder.get_init_states(batch_size, device) + [
            self.encoder_embed.get_init_states(batch_size, device),
            torch.zeros(batch_size, dtype=torch.int64, device=device),
        ]

    def streaming_forward_encoder(
        self, x: Tensor, x_lens: Tensor, states: list[Tensor]
    ) -> tuple[Tensor, Tensor, list[Tensor]]:
        """One streaming chunk of a causal model (eval).

        x: (N, 2 * chunk + 13, 80) features, i.e. 2 * chunk new frames plus 13 frames of
        look-ahead (7 for Conv-Embed, 2 * 3 for ConvNeXt), where chunk =
        ``encoder.chunk_size[0]``; the next chunk starts 2 * chunk frames later.
        Returns (encoder_out (N, chunk // 2, C), lengths, new states).
        """
        left_context_len = self.encoder.left_context_frames[0]
        *encoder_states, embed_cache, processed_lens = states
        x, x_lens, embed_cache = self.encoder_embed.streaming_forward(x, x_lens, embed_cache)
        chunk_mask = make_pad_mask(x_lens, x.shape[1])
        # Cache slots not yet filled (start of the utterance) are padding.
        slots = torch.arange(left_context_len, device=x.device).expand(x.shape[0], -1)
        cache_mask = (processed_lens.unsqueeze(1) <= slots).flip(1)
        src_key_padding_mask = torch.cat([cache_mask, chunk_mask], dim=1)
        out, out_lens, encoder_states = self.encoder.streaming_forward(
            x.permute(1, 0, 2), x_lens, encoder_states, src_key_padding_mask
        )
        new_states = encoder_states + [embed_cache, processed_lens + x_lens]
        return out.permute(1, 0, 2), out_lens, new_states

    # -- losses (the loss functions live in zipasr.loss) ----------------------------------

    def forward_ctc(self, encoder_out: Tensor, encoder_out_lens: Tensor, targets: Tensor,
                    target_lengths: Tensor) -> Tensor:
        """CTC loss summed over the batch; targets are concatenated (sum(target_lengths),)."""
        log_probs = self.ctc_output(encoder_out)  # (N, T, V)
        return torch.nn.functional.ctc_loss(
            log_probs=log_probs.permute(1, 0, 2), targets=targets.cpu(),
            input_lengths=encoder_out_lens.cpu(), target_lengths=target_lengths.cpu(),
            reduction="sum",
        )

    def forward_transducer(
        self,
        encoder_out: Tensor,
        encoder_out_lens: Tensor,
        y_padded: Tensor,
        y_lens: Tensor,
        prune_range: int = 5,
        am_scale: float = 0.0,
        lm_scale: float = 0.0,
        joiner_bf16: bool = False,
    ) -> tuple[Tensor, Tensor]:
        """Pruned RNN-T: (simple_loss, pruned_loss), both summed over the batch.

        encoder_out: (N, T, C); y_padded: (N, S) int64 padded with 0; y_lens: (N,).
        ``joiner_bf16`` runs the joiner (its (N, T, prune_range, joiner_dim) x
        (joiner_dim, V) product is a small model's largest) under bfloat16 autocast; the
        loss itself is computed in float32 at least (float64 for a float64 model).
        """
        from zipasr import loss as rnnt

        blank_id = self.decoder.blank_id
        N, S = y_padded.shape
        valid = make_pad_mask(y_lens, S).logical_not()
        sos_y = torch.full((N, S + 1), blank_id, dtype=torch.int64, device=y_padded.device)
        sos_y[:, 1:] = torch.where(valid, y_padded, blank_id)
        decoder_out = self.decoder(sos_y)  # (N, S + 1, D)
        y_padded = torch.where(valid, y_padded, 0)

        boundary = torch.zeros(N, 4, dtype=torch.int64, device=encoder_out.device)
        boundary[:, 2] = y_lens
        boundary[:, 3] = encoder_out_lens

        lm = self.simple_lm_proj(decoder_out)
        am = self.simple_am_proj(encoder_out)
        with torch.autocast(device_type=encoder_out.device.type, enabled=False):
            simple_loss, (px_grad, py_grad) = rnnt.rnnt_loss_smoothed(
                lm=at_least_f32(lm), am=at_least_f32(am), symbols=y_padded,
                termination_symbol=blank_id, lm_only_scale=lm_scale, am_only_scale=am_scale,
                boundary=boundary, reduction="sum", return_grad=True,
            )
        ranges = rnnt.get_rnnt_prune_ranges(
            px_grad=px_grad, py_grad=py_grad, boundary=boundary, s_range=prune_range
        )
        am_pruned, lm_pruned = rnnt.do_rnnt_pruning(
            am=self.joiner.encoder_proj(encoder_out),
            lm=self.joiner.decoder_proj(decoder_out),
            ranges=ranges,
        )
        with (torch.autocast(device_type=encoder_out.device.type, dtype=torch.bfloat16)
              if joiner_bf16 else nullcontext()):
            logits = self.joiner(am_pruned, lm_pruned, project_input=False)
        with torch.autocast(device_type=encoder_out.device.type, enabled=False):
            pruned_loss = rnnt.rnnt_loss_pruned(
                logits=at_least_f32(logits), symbols=y_padded, ranges=ranges,
                termination_symbol=blank_id, boundary=boundary, reduction="sum",
            )
        return simple_loss, pruned_loss

    def forward(
        self,
        x: Tensor,
        x_lens: Tensor,
        y: Sequence[Sequence[int]] | tuple[Tensor, Tensor],
        prune_range: int = 5,
        am_scale: float = 0.0,
        lm_scale: float = 0.0,
        joiner_bf16: bool = False,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Losses for a batch, like icefall's AsrModel.forward.

        x: (N, T, 80); x_lens: (N,); y: token id lists, or (y_padded (N, S), y_lens).
        Returns (simple_loss, pruned_loss, ctc_loss), each summed over the batch; a loss
        whose head is disabled is an empty tensor.
        """
        assert x.ndim == 3 and x_lens.ndim == 1
        encoder_out, encoder_out_lens = self.forward_encoder(x, x_lens)
        y_padded, y_lens = _as_padded(y, self.config.blank_id, x.device)
        empty = torch.empty(0, device=x.device)
        simple_loss = pruned_loss = ctc_loss = empty
        if self.use_transducer:
            simple_loss, pruned_loss = self.forward_transducer(
                encoder_out, encoder_out_lens, y_padded, y_lens, prune_range, am_scale, lm_scale,
                joiner_bf16,
            )
        if self.use_ctc:
            valid = make_pad_mask(y_lens, y_padded.shape[1]).logical_not()
            ctc_loss = self.forward_ctc(encoder_out, encoder_out_lens, y_padded[valid], y_lens)
        return simple_loss, pruned_loss, ctc_loss

    # -- reporting ---------------------------------------------------------------------

    def num_params_by_component(self) -> dict[str, int]:
        """Parameter counts per top-level component (plus "total")."""
        counts = {name: sum(p.numel() for p in m.parameters())
                  for name, m in self.named_children()}
        counts["total"] = sum(p.numel() for p in self.parameters())
        return counts
