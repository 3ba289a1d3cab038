"""Export a trained transducer to ONNX for sherpa-onnx's offline (non-streaming) recognizer.

Three graphs and a token table, laid out as sherpa-onnx's ``OfflineRecognizer.from_transducer``
expects them (docs/deploy.md has the contract in full):

* ``encoder.onnx``: ``x`` (N, T, 80) float32, ``x_lens`` (N,) int64 -> ``encoder_out``
  (N, T', joiner_dim), ``encoder_out_lens`` (N,); the joiner's ``encoder_proj`` is folded in.
* ``decoder.onnx``: ``y`` (N, context_size) int64 -> ``decoder_out`` (N, joiner_dim); the
  joiner's ``decoder_proj`` is folded in; negative ids (the start context) embed to zeros.
* ``joiner.onnx``: ``encoder_out``, ``decoder_out`` (N, joiner_dim) -> ``logit`` (N, vocab).
* ``tokens.txt``: ``piece id`` per line, every id the joiner can emit.
* optionally ``*.int8.onnx``: onnxruntime's dynamic int8 quantization of the three graphs.

The wrappers compute exactly what :func:`zipasr.decode.search.search` computes from the
PyTorch model (same modules, same weights); the gradient-shaping and dropout modules, which are
identities at inference, are replaced by ``nn.Identity`` so nothing random or training-only can
reach a traced graph. Graphs come from the TorchScript-based exporter (``dynamo=False``), which
traces the eval forward with symbolic sizes; every export is checked against the PyTorch model
on a ragged batch before it is written.

:func:`export_transducer` is the part both exports share (checks, inference copy, tokens.txt,
decoder, joiner, verification, int8, atomic directory); the streaming export of a causal model
(:mod:`zipasr.deploy.onnx_streaming`) plugs its chunk-wise encoder into it.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import shutil
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

from zipasr.errors import ZipasrError
from zipasr.io import atomic_dir

log = logging.getLogger(__name__)

# icefall's export-onnx.py uses opset 13, the version sherpa-onnx's models are built with.
DEFAULT_OPSET = 13
# 11 and 12 lack integer Clip (the decoder's clamp of the -1 context); 13..20 export and load
OPSETS = range(13, 21)
FP32_FILES = ("encoder.onnx", "decoder.onnx", "joiner.onnx")
INT8_FILES = ("encoder.int8.onnx", "decoder.int8.onnx", "joiner.int8.onnx")
TOKENS_FILE = "tokens.txt"
# sherpa-onnx pads the features of a batch with log(1e-10) (as lhotse's LOG_EPSILON).
PAD_VALUE = -23.025850929940457
# the export's self-check: largest difference relative to the largest PyTorch value
VERIFY_RTOL = 1e-4
# Operators onnxruntime's dynamic quantization converts (icefall's choice): the encoder's
# linear layers on 3-D tensors are MatMuls; the decoder's embedding is a Gather.
QUANTIZE_OPS = {"encoder": ["MatMul"], "decoder": ["MatMul", "Gather"], "joiner": ["MatMul"]}


# -- wrappers ------------------------------------------------------------------------------


class OnnxEncoder(nn.Module):
    """Conv-Embed + Zipformer2 + the joiner's encoder projection, batch-major in and out."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: Tensor, x_lens: Tensor) -> tuple[Tensor, Tensor]:
        encoder_out, encoder_out_lens = self.model.forward_encoder(x, x_lens)
        return self.model.joiner.encoder_proj(encoder_out), encoder_out_lens


class OnnxDecoder(nn.Module):
    """The stateless decoder on exactly ``context_size`` ids + the joiner's decoder projection:
    (N, context_size) -> (N, joiner_dim), what the search computes per hypothesis."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.decoder = model.decoder
        self.decoder_proj = model.joiner.decoder_proj

    def forward(self, y: Tensor) -> Tensor:
        return self.decoder_proj(self.decoder(y, need_pad=False).squeeze(1))


class OnnxJoiner(nn.Module):
    """The joiner on projected inputs: output_linear(tanh(encoder_out + decoder_out))."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.output_linear = model.joiner.output_linear

    def forward(self, encoder_out: Tensor, decoder_out: Tensor) -> Tensor:
        return self.output_linear(torch.tanh(encoder_out + decoder_out))


def inference_copy(model: nn.Module) -> nn.Module:
    """A deep copy in eval mode with the training-only modules replaced by ``nn.Identity``:
    Balancer, Whiten, ScaleGrad and the dropouts are identities in an eval forward, so the
    outputs are unchanged, and the copy cannot draw random numbers while being traced."""
    from zipasr.model.scaling import Balancer, Dropout2, Dropout3, ScaleGrad, Whiten

    training_only = (Balancer, Whiten, ScaleGrad, Dropout2, Dropout3, nn.Dropout)
    model = copy.deepcopy(model).eval()
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, training_only):
                setattr(parent, name, nn.Identity())
    return model.eval()


def check_exportable(model: nn.Module, streaming: bool = False) -> None:
    """Refuse what sherpa-onnx's transducer recognizers cannot run, or what the chosen export
    (offline, or ``streaming`` for a causal model) does not fit."""
    config = model.config
    if not config.use_transducer:
        raise ZipasrError("the model has no transducer head (use_transducer: false): nothing "
                          "for sherpa-onnx's transducer recognizer to run")
    if config.blank_id != 0:
        raise ZipasrError(f"sherpa-onnx hard-codes blank id 0; the model's is {config.blank_id}")
    if config.causal and not streaming:
        raise ZipasrError("the model is causal (a streaming model): use --streaming (zipasr "
                          "export-onnx --streaming [--chunk-size C --left-context-frames L]) "
                          "to export it for sherpa-onnx's OnlineRecognizer; the export without "
                          "--streaming is for non-causal (offline) models")
    if streaming and not config.causal:
        raise ZipasrError("--streaming needs a causal model (trained with model.causal: true): "
                          "this model's encoder attends to the whole utterance and was never "
                          "trained on chunks, so it cannot run chunk by chunk; export it "
                          "without --streaming for sherpa-onnx's OfflineRecognizer")


# -- export --------------------------------------------------------------------------------


@dataclass
class ExportReport:
    """What one export wrote and how closely its fp32 graphs reproduce the PyTorch model
    (largest absolute difference over the largest absolute PyTorch value, per graph)."""

    out_dir: Path
    files: list[str]
    opset: int
    rel_diff: dict[str, float] = field(default_factory=dict)


def _dummy_features(n: int, frames: int, feature_dim: int) -> tuple[Tensor, Tensor]:
    """A ragged batch: random features, the second utterance shorter and padded as sherpa
    pads. A seeded generator keeps the global RNG untouched."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, frames, feature_dim, generator=g)
    x_lens = torch.full((n,), frames, dtype=torch.int64)
    for i in range(1, n):
        x_lens[i] = frames - 13 * i
        x[i, int(x_lens[i]):] = PAD_VALUE
    return x, x_lens


def _export(module: nn.Module, args: tuple[Tensor, ...], path: Path, opset: int,
            input_names: list[str], output_names: list[str],
            dynamic_axes: Mapping[str, Mapping[int, str]]) -> None:
    # The TorchScript-based exporter: it traces the eval forward with symbolic sizes, so
    # lengths computed from shapes stay dynamic. (The dynamo exporter, torch's default, needs
    # onnxscript and stops at the forward's data-dependent checks such as
    # int(x_lens.max()): docs/deploy.md.)
    module.eval()  # the exporter restores the wrapper's mode, and that mode reaches the model
    with torch.no_grad(), warnings.catch_warnings():
        # shape asserts in the model are evaluated once at trace time, as intended
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=".*dynamo=False.*")
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        # the streaming graph's cache masks use flip (a Slice with step -1), which is left
        # unfolded: harmless
        warnings.filterwarnings("ignore", message="Constant folding - Only steps=1")
        torch.onnx.export(module, args, str(path), dynamo=False, opset_version=opset,
                          input_names=input_names, output_names=output_names,
                          dynamic_axes={k: dict(v) for k, v in dynamic_axes.items()},
                          do_constant_folding=True)


def add_metadata(path: Path, metadata: Mapping[str, str]) -> None:
    """Set (or replace) string metadata entries of an ONNX file; sherpa-onnx reads them."""
    import onnx

    model = onnx.load(str(path))
    props = {p.key: p.value for p in model.metadata_props}
    props.update({k: str(v) for k, v in metadata.items()})
    del model.metadata_props[:]
    for k, v in props.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = k, v
    onnx.save(model, str(path))


def read_metadata(path: str | Path) -> dict[str, str]:
    import onnx

    return {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}


def ort_session(path: str | Path) -> Any:
    """An onnxruntime CPU session on one thread (deterministic, and the machine is shared)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def _rel_diff(got: Any, want: Tensor) -> float:
    want_np = want.detach().numpy()
    scale = max(float(abs(want_np).max()), 1e-30)
    return float(abs(got - want_np).max()) / scale


def _verify_encoder(out_dir: Path, encoder: OnnxEncoder, feature_dim: int
                    ) -> tuple[float, Tensor]:
    """Run encoder.onnx in onnxruntime on inputs other than the traced ones (another length
    and batch size, padding) and compare with PyTorch: (relative difference, the first
    output frame of each utterance (3, joiner_dim) for the joiner's check)."""
    x, x_lens = _dummy_features(3, 171, feature_dim)
    with torch.no_grad():
        enc, enc_lens = encoder(x, x_lens)
    got_enc, got_lens = ort_session(out_dir / "encoder.onnx").run(
        None, {"x": x.numpy(), "x_lens": x_lens.numpy()})
    if got_lens.tolist() != enc_lens.tolist() or got_enc.shape != tuple(enc.shape):
        raise ZipasrError(f"exported encoder gives lengths {got_lens.tolist()} / shape "
                          f"{got_enc.shape}, PyTorch {enc_lens.tolist()} / {tuple(enc.shape)}")
    # valid frames only: padded frames are don't-care outputs
    valid = torch.arange(enc.shape[1]).unsqueeze(0) < enc_lens.unsqueeze(1)
    return _rel_diff(got_enc[valid.numpy()], enc[valid]), enc[:, 0]


def _verify_decoder_joiner(out_dir: Path, decoder: OnnxDecoder, joiner: OnnxJoiner,
                           encoder_rows: Tensor, vocab_size: int, context_size: int
                           ) -> dict[str, float]:
    """decoder.onnx on random contexts and the -1 start context, joiner.onnx on
    ``encoder_rows`` (R, joiner_dim) of real encoder output, against PyTorch."""
    y = torch.randint(0, vocab_size, (5, context_size), generator=torch.Generator().manual_seed(1))
    y[0, :-1] = -1  # the start context [-1, ..., blank]
    y[0, -1] = 0
    rows = encoder_rows.shape[0]
    with torch.no_grad():
        dec = decoder(y)
        logit = joiner(encoder_rows, dec[:rows])
    (got_dec,) = ort_session(out_dir / "decoder.onnx").run(None, {"y": y.numpy()})
    (got_logit,) = ort_session(out_dir / "joiner.onnx").run(
        None, {"encoder_out": encoder_rows.numpy(), "decoder_out": dec[:rows].numpy()})
    return {"decoder": _rel_diff(got_dec, dec), "joiner": _rel_diff(got_logit, logit)}


def quantize_int8(src: Path, dst: Path, op_types: list[str]) -> None:
    """onnxruntime's dynamic quantization: int8 weights, activations quantized per batch at
    run time; the metadata is carried over."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with _quiet_root_logger():  # it logs a line per tensor through the root logger
        quantize_dynamic(model_input=str(src), model_output=str(dst),
                         op_types_to_quantize=op_types, weight_type=QuantType.QInt8)
    add_metadata(dst, read_metadata(src))


@contextlib.contextmanager
def _quiet_root_logger():
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def write_tokens_table(out: Path, vocab_size: int, *, bpe_model: Path | None = None,
                       tokens: Path | None = None) -> None:
    """``tokens.txt`` from the BPE model (icefall's layout, zipasr.lang.bpe) or a copy of a
    given table, checked to list exactly the ids 0..vocab_size-1 with ``<blk>`` as 0."""
    from zipasr.lang.bpe import BLANK, read_tokens, write_tokens

    if (bpe_model is None) == (tokens is None):
        raise ZipasrError("give exactly one of a BPE model and a tokens.txt")
    src = bpe_model if bpe_model is not None else tokens
    if not Path(src).is_file():
        raise ZipasrError(f"{src} does not exist")
    if bpe_model is not None:
        write_tokens(Path(bpe_model), out)
    else:
        shutil.copyfile(tokens, out)
    try:
        table = read_tokens(out)
    except ValueError as e:
        raise ZipasrError(f"{src}: not a 'symbol id' table ({e})") from e
    ids = sorted(table.values())
    if ids != list(range(vocab_size)):
        raise ZipasrError(f"{src} has ids {ids[:3]}...{ids[-3:]} ({len(ids)} entries); the "
                          f"model's joiner emits ids 0..{vocab_size - 1}, each must be listed")
    if table.get(BLANK) != 0:
        raise ZipasrError(f"{src}: id 0 must be {BLANK} (sherpa-onnx's blank)")


def _chmod_like_mkdir(path: Path) -> None:
    """The permissions ``mkdir`` would give (the temporary directory is private, 0700), so
    the exported directory is as readable as any other output."""
    umask = os.umask(0)
    os.umask(umask)
    path.chmod(0o777 & ~umask)


def encoder_metadata(model: nn.Module, comment: str) -> dict[str, str]:
    """The encoder metadata both exports write: what sherpa-onnx reads to pick the model
    family (``model_type`` zipformer2, as icefall writes it), icefall's descriptive keys, and
    ``feature_dim`` / ``joiner_dim`` for humans."""
    return {"model_type": "zipformer2", "version": "1", "model_author": "zipasr",
            "comment": comment, "feature_dim": str(model.config.feature_dim),
            "joiner_dim": str(model.joiner.output_linear.in_features)}


# An encoder exporter writes encoder.onnx (with its metadata) into a directory and checks it:
# (model, directory, opset) -> (relative difference to PyTorch, sample rows
# (R, joiner_dim) of its output for the joiner's check).
EncoderExporter = Callable[[nn.Module, Path, int], tuple[float, Tensor]]


def _export_offline_encoder(comment: str) -> EncoderExporter:
    def export(model: nn.Module, out_dir: Path, opset: int) -> tuple[float, Tensor]:
        encoder = OnnxEncoder(model)
        x, x_lens = _dummy_features(2, 100, model.config.feature_dim)
        _export(encoder, (x, x_lens), out_dir / "encoder.onnx", opset, ["x", "x_lens"],
                ["encoder_out", "encoder_out_lens"],
                {"x": {0: "N", 1: "T"}, "x_lens": {0: "N"}, "encoder_out": {0: "N", 1: "T_out"},
                 "encoder_out_lens": {0: "N"}})
        add_metadata(out_dir / "encoder.onnx", encoder_metadata(
            model, comment or "non-streaming zipformer2 (zipasr export-onnx)"))
        return _verify_encoder(out_dir, encoder, model.config.feature_dim)

    return export


def export_transducer(model: nn.Module, out_dir: str | Path, export_encoder: EncoderExporter,
                      *, streaming: bool, bpe_model: str | Path | None = None,
                      tokens: str | Path | None = None, int8: bool = True,
                      opset: int = DEFAULT_OPSET) -> ExportReport:
    """What the offline and the streaming export share: checks, the inference copy,
    tokens.txt, the decoder and joiner graphs, the check against PyTorch, int8, and the
    atomic directory; ``export_encoder`` writes the one graph in which they differ."""
    check_exportable(model, streaming=streaming)
    if opset not in OPSETS:
        raise ZipasrError(f"opset {opset} is not supported: {OPSETS.start}..{OPSETS.stop - 1}")
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError as e:
        raise ZipasrError(f"the ONNX export needs onnx and onnxruntime ({e}): install the "
                          "`deploy` extra, pip install -e '.[deploy]'") from e
    config = model.config
    out_dir = Path(out_dir)
    model = inference_copy(model).to("cpu")
    decoder, joiner = OnnxDecoder(model), OnnxJoiner(model)
    vocab_size, context_size = config.vocab_size, config.context_size
    joiner_dim = model.joiner.output_linear.in_features
    files: list[str] = []
    with atomic_dir(out_dir) as tmp:
        _chmod_like_mkdir(tmp)
        write_tokens_table(tmp / TOKENS_FILE, vocab_size,
                           bpe_model=None if bpe_model is None else Path(bpe_model),
                           tokens=None if tokens is None else Path(tokens))
        log.info("exporting the %sencoder (opset %d)", "streaming " if streaming else "", opset)
        encoder_diff, encoder_rows = export_encoder(model, tmp, opset)
        log.info("exporting the decoder and the joiner")
        y = torch.zeros(3, context_size, dtype=torch.int64)
        _export(decoder, (y,), tmp / "decoder.onnx", opset, ["y"], ["decoder_out"],
                {"y": {0: "N"}, "decoder_out": {0: "N"}})
        add_metadata(tmp / "decoder.onnx", {"vocab_size": str(vocab_size),
                                            "context_size": str(context_size)})
        e, d = torch.zeros(3, joiner_dim), torch.zeros(3, joiner_dim)
        _export(joiner, (e, d), tmp / "joiner.onnx", opset, ["encoder_out", "decoder_out"],
                ["logit"], {"encoder_out": {0: "N"}, "decoder_out": {0: "N"}, "logit": {0: "N"}})
        add_metadata(tmp / "joiner.onnx", {"joiner_dim": str(joiner_dim)})
        files += [TOKENS_FILE, *FP32_FILES]

        diffs = {"encoder": encoder_diff, **_verify_decoder_joiner(
            tmp, decoder, joiner, encoder_rows, vocab_size, context_size)}
        bad = {k: v for k, v in diffs.items() if not v <= VERIFY_RTOL}
        if bad:
            raise ZipasrError(f"the exported graphs do not reproduce the PyTorch model: "
                              f"relative difference {bad} > {VERIFY_RTOL}")
        log.info("onnxruntime vs PyTorch, relative difference: %s",
                 ", ".join(f"{k} {v:.1e}" for k, v in diffs.items()))
        if int8:
            log.info("quantizing to int8")
            for name in ("encoder", "decoder", "joiner"):
                quantize_int8(tmp / f"{name}.onnx", tmp / f"{name}.int8.onnx",
                              QUANTIZE_OPS[name])
            files += list(INT8_FILES)
    for f in files:
        log.info("wrote %s (%.1f MB)", out_dir / f, (out_dir / f).stat().st_size / 1e6)
    return ExportReport(out_dir, files, opset, diffs)


def export_onnx(model: nn.Module, out_dir: str | Path, *, bpe_model: str | Path | None = None,
                tokens: str | Path | None = None, int8: bool = True,
                opset: int = DEFAULT_OPSET, comment: str = "") -> ExportReport:
    """Export ``model`` (a non-causal :class:`~zipasr.model.Transducer`) into ``out_dir`` for
    sherpa-onnx's offline recognizer.

    The directory is built under a temporary name and renamed into place when complete, so an
    interrupted export leaves no partial ``out_dir`` (a previous one stays until replaced).
    """
    return export_transducer(model, out_dir, _export_offline_encoder(comment), streaming=False,
                             bpe_model=bpe_model, tokens=tokens, int8=int8, opset=opset)
