"""Export a causal (streaming) transducer to ONNX for sherpa-onnx's ``OnlineRecognizer``.

The decoder, joiner, tokens.txt, int8 files and the atomic output directory are the offline
export's (:func:`zipasr.deploy.onnx_export.export_transducer`); only the encoder differs. The
streaming ``encoder.onnx`` runs one chunk with explicit caches, laid out as sherpa-onnx's
zipformer2 online model binds them (by position; docs/deploy.md, "Streaming"):

* inputs: ``x`` (N, T, 80) float32 with T = 2 * chunk + 13 fixed; per encoder layer i (all
  stacks, flattened) ``cached_key_i``, ``cached_nonlin_attn_i``, ``cached_val1_i``,
  ``cached_val2_i``, ``cached_conv1_i``, ``cached_conv2_i``; ``embed_states``
  (N, 128, 3, 19); ``processed_lens`` (N,) int64;
* outputs: ``encoder_out`` (N, chunk // 2, joiner_dim) through the joiner's ``encoder_proj``,
  then ``new_<name>`` of every state, in the input order and shapes.

chunk and left context are in 50 Hz frames (after Conv-Embed), as icefall's
``--chunk-size`` / ``--left-context-frames``; sherpa-onnx's ``decode_chunk_len`` is 2 * chunk
feature frames (100 Hz).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from zipasr.deploy.onnx_export import (
    DEFAULT_OPSET,
    EncoderExporter,
    ExportReport,
    _export,
    _rel_diff,
    add_metadata,
    check_exportable,
    encoder_metadata,
    export_transducer,
    ort_session,
)
from zipasr.errors import ZipasrError
from zipasr.model.config import check_chunking

# icefall's defaults for export-onnx-streaming.py (50 Hz frames)
DEFAULT_CHUNK_SIZE = 16
DEFAULT_LEFT_CONTEXT_FRAMES = 128
# Look-ahead of a chunk in feature frames: Conv-Embed needs 7 more input frames than twice
# its output, and its ConvNeXt (7x7 kernel) 3 more output frames = 6 input frames.
PAD_LENGTH = 7 + 2 * 3
# sherpa-onnx creates the initial embed_states itself as zeros (N, 128, 3, 19): icefall's
# Conv-Embed width and 80 fbank bins. Nothing else about the shape can be told to it.
SHERPA_EMBED_CHANNELS = 128
SHERPA_FEATURE_DIM = 80
# the six caches of one encoder layer, in the model's (and sherpa-onnx's) order, and the
# axis of each that is the batch
LAYER_STATES = ("cached_key", "cached_nonlin_attn", "cached_val1", "cached_val2",
                "cached_conv1", "cached_conv2")
BATCH_AXIS = {"cached_key": 1, "cached_nonlin_attn": 1, "cached_val1": 1, "cached_val2": 1,
              "cached_conv1": 0, "cached_conv2": 0, "embed_states": 0, "processed_lens": 0}


def state_names(num_layers: int) -> list[str]:
    """Input names of the states after ``x``, in sherpa-onnx's order; outputs are
    ``new_`` + each."""
    return [f"{s}_{i}" for i in range(num_layers) for s in LAYER_STATES] + [
        "embed_states", "processed_lens"]


def batch_axis(name: str) -> int:
    """The batch axis of a state input (or its ``new_`` output) called ``name``."""
    base = name.removeprefix("new_")
    return BATCH_AXIS[base if base in BATCH_AXIS else base.rsplit("_", 1)[0]]


def check_streaming(model: nn.Module, chunk_size: int, left_context_frames: int) -> None:
    """Refuse a model or chunk configuration sherpa-onnx's online zipformer2 cannot run."""
    check_exportable(model, streaming=True)
    config = model.config
    if config.feature_dim != SHERPA_FEATURE_DIM:
        raise ZipasrError(f"sherpa-onnx's streaming Zipformer takes {SHERPA_FEATURE_DIM}-bin "
                          f"fbank (its Conv-Embed state is hard-coded for that width); the model "
                          f"has feature_dim {config.feature_dim}")
    if config.embed_channels[2] > SHERPA_EMBED_CHANNELS:
        raise ZipasrError(f"the model's Conv-Embed has {config.embed_channels[2]} channels in its "
                          f"last layer; sherpa-onnx's streaming state holds at most "
                          f"{SHERPA_EMBED_CHANNELS} (embed_states is (N, 128, 3, 19))")
    # the same rule as zipasr's own chunk-wise decoding (and the DAG's check at load): whole
    # frames at every stack's rate, whole chunks of left context covering the convolutions'
    # left half-kernels, as the model was trained
    try:
        check_chunking(config, chunk_size, left_context_frames)
    except ZipasrError as e:
        raise ZipasrError(f"--chunk-size {chunk_size} --left-context-frames "
                          f"{left_context_frames}: {e}") from None


class OnnxStreamingEncoder(nn.Module):
    """One chunk of Conv-Embed + Zipformer2 + the joiner's encoder projection, with the
    caches as separate inputs and outputs (sherpa-onnx's order, see :func:`state_names`).

    ``model`` must be an inference copy whose encoder is set to one chunk size and left
    context (``encoder.chunk_size = [chunk]``, ``encoder.left_context_frames = [left]``).
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.chunk_size = model.encoder.chunk_size[0]
        self.T = 2 * self.chunk_size + PAD_LENGTH
        self.embed_channels = model.encoder_embed.layer3_channels

    def forward(self, x: Tensor, *states: Tensor) -> tuple[Tensor, ...]:
        """x: (N, T, 80); states as :meth:`init_states` -> (encoder_out (N, chunk // 2,
        joiner_dim), *new states)."""
        *layer_states, embed_states, processed_lens = states
        # x is always a full chunk: T frames for every stream
        x_lens = torch.full_like(processed_lens, self.T)
        # sherpa-onnx's embed state has 128 channels; a narrower Conv-Embed uses the first
        # ones and returns its new cache zero-padded back to 128 (the rest stays 0: an opaque
        # state to sherpa, which only stores and batches it).
        embed_cache = embed_states[:, : self.embed_channels]
        out, _, new_states = self.model.streaming_forward_encoder(
            x, x_lens, [*layer_states, embed_cache, processed_lens])
        *new_layer_states, new_embed, new_processed = new_states
        new_embed = F.pad(new_embed, (0, 0, 0, 0, 0, SHERPA_EMBED_CHANNELS - self.embed_channels))
        return (self.model.joiner.encoder_proj(out), *new_layer_states, new_embed, new_processed)

    def init_states(self, batch_size: int) -> list[Tensor]:
        """Zero states as sherpa-onnx creates them (embed_states with 128 channels)."""
        *layer_states, embed, processed = self.model.get_init_states(batch_size)
        embed = embed.new_zeros(batch_size, SHERPA_EMBED_CHANNELS, *embed.shape[2:])
        return [*layer_states, embed, processed]


def streaming_metadata(model: nn.Module, comment: str) -> dict[str, str]:
    """The encoder metadata sherpa-onnx's online zipformer2 reads (a missing key stops
    loading), per-stack values comma-separated; plus the offline export's keys."""
    enc = model.encoder
    chunk, left = enc.chunk_size[0], enc.left_context_frames[0]

    def per_stack(values: tuple[int, ...] | list[int]) -> str:
        return ",".join(str(v) for v in values)

    return {
        **encoder_metadata(model, comment),
        "decode_chunk_len": str(2 * chunk),  # feature frames (100 Hz) a chunk advances
        "T": str(2 * chunk + PAD_LENGTH),  # feature frames a chunk reads
        "num_encoder_layers": per_stack(enc.num_encoder_layers),
        "encoder_dims": per_stack(enc.encoder_dim),
        "cnn_module_kernels": per_stack(enc.cnn_module_kernel),
        "left_context_len": per_stack([left // d for d in enc.downsampling_factor]),
        "query_head_dims": per_stack(enc.query_head_dim),
        "value_head_dims": per_stack(enc.value_head_dim),
        "num_heads": per_stack(enc.num_heads),
        "chunk_size": str(chunk), "left_context_frames": str(left),  # for humans
    }


def _verify_streaming_encoder(path: Path, encoder: OnnxStreamingEncoder, batch_size: int = 3,
                              chunks: int = 3) -> tuple[float, Tensor]:
    """encoder.onnx in onnxruntime against PyTorch over ``chunks`` chunks of random
    features, states carried (another batch size than the traced one; non-zero caches from
    the second chunk on): (largest relative difference of encoder_out and of the states,
    the last chunk's first output frame per stream (batch_size, joiner_dim))."""
    session = ort_session(path)
    names = [i.name for i in session.get_inputs()]
    g = torch.Generator().manual_seed(0)
    want_states = encoder.init_states(batch_size)
    got_states = [s.numpy() for s in want_states]
    worst = 0.0
    for _ in range(chunks):
        x = torch.randn(batch_size, encoder.T, SHERPA_FEATURE_DIM, generator=g)
        with torch.no_grad():
            want_out, *want_states = encoder(x, *want_states)
        got_out, *got_states = session.run(None, dict(zip(names, [x.numpy(), *got_states],
                                                          strict=True)))
        if got_out.shape != tuple(want_out.shape):
            raise ZipasrError(f"exported streaming encoder gives {got_out.shape}, PyTorch "
                              f"{tuple(want_out.shape)}")
        diffs = [_rel_diff(got_out, want_out)] + [
            _rel_diff(got, want) for got, want in zip(got_states[:-1], want_states[:-1],
                                                      strict=True)]
        worst = max(worst, *diffs)
        if got_states[-1].tolist() != want_states[-1].tolist():
            raise ZipasrError(f"exported streaming encoder counts {got_states[-1].tolist()} "
                              f"processed frames, PyTorch {want_states[-1].tolist()}")
    return worst, want_out[:, 0]


def _declare_output_shapes(path: Path, shapes: dict[str, tuple[int, ...]]) -> None:
    """Write the outputs' static shapes into the graph (batch axis "N"). The exporter leaves
    names such as ``Slicenew_cached_key_0_dim_0`` for sizes it computed from shapes in the
    trace, although with a fixed T every size but the batch is a constant; declared, a reader
    (or onnxruntime's shape check) sees the same fixed shapes as the inputs have."""
    import onnx

    model = onnx.load(str(path))
    for output in model.graph.output:
        dims = output.type.tensor_type.shape.dim
        name = output.name
        axis = 0 if name == "encoder_out" else batch_axis(name)
        for i, (dim, size) in enumerate(zip(dims, shapes[name], strict=True)):
            if i == axis:
                dim.dim_param = "N"
            else:
                dim.dim_value = size
    onnx.save(model, str(path))


def _export_streaming_encoder(comment: str, chunk_size: int, left_context_frames: int
                              ) -> EncoderExporter:
    def export(model: nn.Module, out_dir: Path, opset: int) -> tuple[float, Tensor]:
        # the model is the export's own inference copy: set to the one decoding configuration
        # (icefall does the same), instead of the lists training draws from
        model.encoder.chunk_size = [chunk_size]
        model.encoder.left_context_frames = [left_context_frames]
        encoder = OnnxStreamingEncoder(model)
        names = state_names(sum(model.encoder.num_encoder_layers))
        # traced with 2 streams (not 1, whose size-1 axes the exporter could fold away)
        x = torch.zeros(2, encoder.T, SHERPA_FEATURE_DIM)
        path = out_dir / "encoder.onnx"
        states = encoder.init_states(2)
        output_names = ["encoder_out", *(f"new_{n}" for n in names)]
        _export(encoder, (x, *states), path, opset, ["x", *names], output_names,
                {"x": {0: "N"}, "encoder_out": {0: "N"},
                 **{n: {batch_axis(n): "N"} for n in names},
                 **{f"new_{n}": {batch_axis(n): "N"} for n in names}})
        with torch.no_grad():
            outputs = encoder(x, *states)
        _declare_output_shapes(path, {n: tuple(o.shape) for n, o in
                                      zip(output_names, outputs, strict=True)})
        add_metadata(path, streaming_metadata(
            model, comment or "streaming zipformer2 (zipasr export-onnx --streaming)"))
        return _verify_streaming_encoder(path, encoder)

    return export


def export_onnx_streaming(model: nn.Module, out_dir: str | Path, *,
                          chunk_size: int = DEFAULT_CHUNK_SIZE,
                          left_context_frames: int = DEFAULT_LEFT_CONTEXT_FRAMES,
                          bpe_model: str | Path | None = None, tokens: str | Path | None = None,
                          int8: bool = True, opset: int = DEFAULT_OPSET,
                          comment: str = "") -> ExportReport:
    """Export a causal ``model`` (a :class:`~zipasr.model.Transducer`) into ``out_dir`` for
    sherpa-onnx's ``OnlineRecognizer``, decoding ``chunk_size`` 50 Hz frames at a time with
    ``left_context_frames`` of attention history. Same files, checks and atomic directory as
    :func:`zipasr.deploy.onnx_export.export_onnx`."""
    check_streaming(model, chunk_size, left_context_frames)
    return export_transducer(
        model, out_dir, _export_streaming_encoder(comment, chunk_size, left_context_frames),
        streaming=True, bpe_model=bpe_model, tokens=tokens, int8=int8, opset=opset)
