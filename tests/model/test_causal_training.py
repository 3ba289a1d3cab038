"""Streaming (causal) Zipformer training as icefall's ``zipformer/zipformer.py`` does it.

* Every forward draws (chunk_size, left_context_chunks) with icefall's rule: one
  ``random.choice`` of the chunk size, then, unless it is -1, one of the left context in
  frames, left_context_chunks = left // chunk with a minimum of 1 (-1 // chunk == -1:
  unlimited). icefall's ``get_chunk_info`` does not look at ``self.training``: eval forwards
  draw too, so an eval model with single-valued lists always uses those values. Checked
  against an independent simulation fed the same Python ``random`` state, including that the
  draws are the only ones made before the mask is built.
* The mask every attention layer applies equals a brute-force mask for that draw, at its
  stack's rate (mask[::ds, ::ds], chunk // ds); the convolutions get chunk // ds.
* ZipformerConfig rejects lists that would only fail at an assert inside some later forward.
* The causal M state dict: the non-causal one with each convolution module's depthwise conv
  replaced by icefall's ChunkCausalDepthwiseConv1d tensors.
* A few real Trainer steps on a causal xs model: checkpoints that say causal and carry the
  lists, loaded back strictly by ``zipasr.decode.model.load_model``.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from torch import Tensor

from zipasr.model import Transducer, ZipformerConfig, make_pad_mask, set_batch_count
from zipasr.model.zipformer import DownsampledZipformer2Encoder, Zipformer2

torch.set_num_threads(1)

ICEFALL_CHUNKS = (16, 32, 64, -1)
ICEFALL_LEFTS = (64, 128, 256, -1)
# left < chunk (the minimum of 1 chunk), left not a multiple of chunk, and -1
EDGE_LEFTS = (16, 48, 128, -1)


def icefall_draw(rng: random.Random, chunks: tuple[int, ...], lefts: tuple[int, ...]
                 ) -> tuple[int, int | None, int]:
    """icefall's Zipformer2.get_chunk_info, written out: (chunk_size, left frames drawn or
    None, left_context_chunks)."""
    chunk = rng.choice(chunks)
    if chunk == -1:
        return -1, None, -1
    left = rng.choice(lefts)
    return chunk, left, max(1, left // chunk) if left != -1 else -1


@functools.cache
def brute_mask(T: int, chunk: int, left_chunks: int) -> Tensor:
    """(T, T), True = masked: query i sees key j iff j's chunk is i's or one of the
    left_chunks before it (all before it for -1)."""
    out = torch.zeros(T, T, dtype=torch.bool)
    for i in range(T):
        for j in range(T):
            ci, cj = i // chunk, j // chunk
            visible = cj <= ci and (left_chunks == -1 or cj >= ci - left_chunks)
            out[i, j] = not visible
    return out


def causal_xs(chunks: tuple[int, ...], lefts: tuple[int, ...]) -> Transducer:
    torch.manual_seed(0)
    return Transducer.from_preset("xs", vocab_size=40, causal=True, chunk_size=chunks,
                                  left_context_frames=lefts)


def stack_layers(enc: Zipformer2) -> list[tuple[int, list[torch.nn.Module]]]:
    """(downsampling factor, its Zipformer blocks) of each stack."""
    out = []
    for ds, module in zip(enc.downsampling_factor, enc.encoders, strict=True):
        inner = module.encoder if isinstance(module, DownsampledZipformer2Encoder) else module
        assert (ds != 1) == isinstance(module, DownsampledZipformer2Encoder)
        out.append((ds, list(inner.layers)))
    return out


class Recorder:
    """Wraps, on one model instance: Zipformer2.forward (the random state at entry),
    _get_attn_mask (its arguments, the random state when it is called, its mask), and per
    stack every block's attention weights (the mask given) and both convolution modules (the
    chunk size given)."""

    def __init__(self, enc: Zipformer2):
        self.forwards: list[dict[str, Any]] = []
        self.stacks = stack_layers(enc)
        fwd, get_mask = enc.forward, enc._get_attn_mask

        def forward(*a: Any, **kw: Any) -> Any:
            self.forwards.append({"entry_state": random.getstate(), "mask_calls": [],
                                  "attn": {}, "conv": {}})
            return fwd(*a, **kw)

        def attn_mask(x: Tensor, chunk_size: int, left_context_chunks: int) -> Tensor | None:
            state = random.getstate()
            mask = get_mask(x, chunk_size, left_context_chunks)
            self.forwards[-1]["mask_calls"].append(
                {"chunk": chunk_size, "left_chunks": left_context_chunks, "state": state,
                 "T": x.shape[0], "mask": mask})
            return mask

        enc.forward, enc._get_attn_mask = forward, attn_mask
        for s, (_, layers) in enumerate(self.stacks):
            for li, layer in enumerate(layers):
                self._wrap(layer.self_attn_weights, "attn", (s, li, "sa"),
                           lambda a, kw: kw.get("attn_mask"))
                for name in ("conv_module1", "conv_module2"):
                    self._wrap(getattr(layer, name), "conv", (s, li, name),
                               lambda a, kw: kw.get("chunk_size", -1))

    def _wrap(self, module: torch.nn.Module, kind: str, key: tuple,
              grab: Callable[[tuple, dict], Any]) -> None:
        orig = module.forward

        def forward(*a: Any, **kw: Any) -> Any:
            self.forwards[-1][kind].setdefault(key, []).append(grab(a, kw))
            return orig(*a, **kw)

        module.forward = forward


def check_forward(rec: dict[str, Any], chunks: tuple[int, ...], lefts: tuple[int, ...],
                  stacks: list[tuple[int, list]]) -> tuple[int, int | None]:
    """One recorded forward against the simulation and brute-force masks; returns the draw."""
    sim = random.Random()
    sim.setstate(rec["entry_state"])
    chunk, left, left_chunks = icefall_draw(sim, chunks, lefts)
    assert len(rec["mask_calls"]) == 1
    call = rec["mask_calls"][0]
    assert (call["chunk"], call["left_chunks"]) == (chunk, left_chunks)
    # exactly icefall's draws were consumed before the mask is built: no more, no fewer
    assert call["state"] == sim.getstate()
    T = call["T"]
    if chunk == -1:
        assert call["mask"] is None
    else:
        assert torch.equal(call["mask"], brute_mask(T, chunk, left_chunks))
    for s, (ds, layers) in enumerate(stacks):
        T_s = (T + ds - 1) // ds  # SimpleDownsample's output length
        for li in range(len(layers)):
            for mask in rec["attn"][(s, li, "sa")]:
                if chunk == -1:
                    assert mask is None
                else:
                    assert mask.shape == (T_s, T_s)
                    assert torch.equal(mask, brute_mask(T_s, chunk // ds, left_chunks))
                    assert torch.equal(mask, call["mask"][::ds, ::ds])
            for name in ("conv_module1", "conv_module2"):
                # -1 // ds == -1: no chunking at any rate
                assert rec["conv"][(s, li, name)] == [chunk // ds], (s, li, name)
    return chunk, left


def run_encoder(model: Transducer, n: int, T: int = 203) -> None:
    """n encoder forwards (T frames at 50 Hz, two sequences, the second shorter)."""
    g = torch.Generator().manual_seed(T)
    x = torch.randn(T, 2, model.encoder.encoder_dim[0], generator=g)
    lens = torch.tensor([T, T - 37])
    with torch.no_grad():
        for _ in range(n):
            model.encoder(x, lens, make_pad_mask(lens))


@pytest.mark.parametrize("lefts", [ICEFALL_LEFTS, EDGE_LEFTS], ids=["icefall", "edge"])
def test_training_forwards_draw_as_icefall(lefts: tuple[int, ...]) -> None:
    model = causal_xs(ICEFALL_CHUNKS, lefts).train()
    set_batch_count(model, 1000.0)
    rec = Recorder(model.encoder)
    random.seed(2024)
    run_encoder(model, 48)
    draws = [check_forward(r, ICEFALL_CHUNKS, lefts, rec.stacks) for r in rec.forwards]
    assert len(draws) == 48
    assert {c for c, _ in draws} == set(ICEFALL_CHUNKS)
    assert {left for c, left in draws if c != -1} == set(lefts)
    assert all(left is None for c, left in draws if c == -1)  # chunk -1: no left draw


def test_full_training_step_draws_as_icefall() -> None:
    """The transducer's training forward (embed, encoder, losses) and backward: the encoder's
    draw is icefall's from whatever state the embed left."""
    model = causal_xs(ICEFALL_CHUNKS, ICEFALL_LEFTS).train()
    set_batch_count(model, 500.0)
    rec = Recorder(model.encoder)
    random.seed(7)
    torch.manual_seed(7)
    x, lens = torch.randn(2, 170, 80), torch.tensor([170, 140])
    y = [[3, 7, 9, 1, 4], [5, 2]]
    for _ in range(6):
        simple, pruned, _ = model(x, lens, y, prune_range=5, am_scale=0.0, lm_scale=0.25)
        model.zero_grad()
        (0.5 * simple + pruned).backward()
        assert torch.isfinite(simple) and torch.isfinite(pruned)
    draws = [check_forward(r, ICEFALL_CHUNKS, ICEFALL_LEFTS, rec.stacks) for r in rec.forwards]
    assert len(draws) == 6 and any(c != -1 for c, _ in draws)


def test_eval_draws_too() -> None:
    """icefall's get_chunk_info draws in eval as in training (decoding passes single-valued
    lists): eval forwards of a model with the training lists follow the same rule."""
    model = causal_xs(ICEFALL_CHUNKS, ICEFALL_LEFTS).eval()
    rec = Recorder(model.encoder)
    random.seed(11)
    run_encoder(model, 12, T=150)
    draws = [check_forward(r, ICEFALL_CHUNKS, ICEFALL_LEFTS, rec.stacks) for r in rec.forwards]
    assert len({c for c, _ in draws}) > 1


@pytest.mark.parametrize("chunk,left,left_chunks", [(32, 128, 4), (16, -1, -1), (64, 16, 1)])
def test_eval_single_valued_lists_use_those_values(chunk: int, left: int,
                                                   left_chunks: int) -> None:
    model = causal_xs((chunk,), (left,)).eval()
    rec = Recorder(model.encoder)
    random.seed(3)
    run_encoder(model, 3, T=150)
    for r in rec.forwards:
        assert check_forward(r, (chunk,), (left,), rec.stacks) == (chunk, left)
        assert r["mask_calls"][0]["left_chunks"] == left_chunks


def test_not_causal_draws_nothing() -> None:
    torch.manual_seed(0)
    model = Transducer.from_preset("xs", vocab_size=40).train()
    rec = Recorder(model.encoder)
    random.seed(5)
    run_encoder(model, 1, T=64)
    call = rec.forwards[0]["mask_calls"][0]
    assert (call["chunk"], call["left_chunks"], call["mask"]) == (-1, -1, None)
    assert call["state"] == rec.forwards[0]["entry_state"]


# -- configuration checks ----------------------------------------------------------------


@pytest.mark.parametrize("preset", ["S", "M", "L", "demo", "xs"])
def test_presets_accept_icefalls_lists(preset: str) -> None:
    cfg = ZipformerConfig.from_preset(preset, causal=True)
    assert (cfg.chunk_size, cfg.left_context_frames) == (ICEFALL_CHUNKS, ICEFALL_LEFTS)
    # and, with every draw, the model's own assert passes (no error deep in a forward)
    with torch.device("meta"):
        enc = Transducer(cfg).encoder
    x = torch.zeros(256, 1, 1)
    for c in cfg.chunk_size:
        for left in cfg.left_context_frames if c != -1 else (-1,):
            enc._get_attn_mask(x, c, -1 if left == -1 else max(1, left // c))


@pytest.mark.parametrize(
    "overrides,message",
    [
        # M's stack 3 runs at 1/8 rate
        ({"chunk_size": (16, 12, -1)}, r"chunk_size 12 is not a multiple of \[8\]"),
        ({"chunk_size": (0,)}, r"chunk_size 0 is not positive"),
        ({"chunk_size": (-2,)}, r"chunk_size -2 is not positive"),
        ({"left_context_frames": (64, 0)}, r"left_context_frames 0: each entry must be -1"),
        ({"left_context_frames": (-3,)}, r"left_context_frames -3"),
        ({"chunk_size": ()}, r"at least one chunk_size"),
        # 8 * max(1, 32 // 8) = 32 < (15 // 2) * 8 = 56 for M's stack 3
        ({"chunk_size": (8, -1), "left_context_frames": (64, 32)},
         r"chunk_size 8 with left_context_frames 32 gives 8 \* max\(1, 32 // 8\) = 32 frames"
         r".*stack 3 needs: \(cnn_module_kernel 15 // 2\) \* downsampling_factor 8 = 56"),
        # left < chunk counts as one chunk: 16 * 1 < 56
        ({"chunk_size": (16,), "left_context_frames": (8,)},
         r"chunk_size 16 with left_context_frames 8 gives 16 \* max\(1, 8 // 16\) = 16"),
        # a wider kernel on the 50 Hz stack: 64 < (255 // 2) * 1
        ({"cnn_module_kernel": (255, 31, 15, 15, 15, 31)},
         r"chunk_size 16 with left_context_frames 64 .* stack 0 needs: \(cnn_module_kernel "
         r"255 // 2\) \* downsampling_factor 1 = 127"),
    ],
)
def test_bad_chunk_lists_fail_at_construction(overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message) as err:
        ZipformerConfig.from_preset("M", causal=True, **overrides)
    if "gives" in message:
        assert "chunk_size * max(1, left_context_frames // chunk_size) >= (cnn_module_kernel" \
            " // 2) * downsampling_factor" in str(err.value)


def test_lists_unchecked_when_not_causal_and_minus_one_skips_the_constraint() -> None:
    # non-causal models never read the lists (icefall's defaults stay in the config)
    ZipformerConfig.from_preset("M", chunk_size=(12,), left_context_frames=(0,))
    # chunk -1 draws no left context; left -1 is unlimited: nothing to check
    ZipformerConfig.from_preset("M", causal=True, chunk_size=(8, -1), left_context_frames=(-1,))
    ZipformerConfig.from_dict({"preset": "xs", "causal": True, "chunk_size": "16,-1",
                               "left_context_frames": "16"})


# -- state-dict layout -------------------------------------------------------------------


def meta_state_shapes(**kw: Any) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        m = Transducer.from_preset("M", vocab_size=500, **kw)
    return {k: tuple(v.shape) for k, v in m.state_dict().items()}


def test_causal_m_state_dict_is_the_non_causal_one_with_chunk_causal_convs() -> None:
    plain, causal = meta_state_shapes(), meta_state_shapes(causal=True)
    expected: dict[str, tuple[int, ...]] = {}
    replaced = 0
    for k, shape in plain.items():
        prefix, _, last = k.rpartition(".")
        if ".conv_module" in k and prefix.endswith(".depthwise_conv"):
            if last == "weight":
                C, one, K = shape
                assert one == 1 and K % 2 == 1
                expected[prefix + ".causal_conv.weight"] = (C, 1, (K + 1) // 2)
                expected[prefix + ".causal_conv.bias"] = (C,)
                expected[prefix + ".chunkwise_conv.weight"] = (C, 1, K)
                expected[prefix + ".chunkwise_conv.bias"] = (C,)
                expected[prefix + ".chunkwise_conv_scale"] = (2, C, K)
                replaced += 1
            else:
                assert last == "bias"
        else:
            expected[k] = shape
    # two convolution modules per block; M has 2+2+3+4+3+2 = 16 blocks
    assert replaced == 32
    # the embed's ConvNeXt depthwise conv is the same in both
    assert causal["encoder_embed.convnext.depthwise_conv.weight"] == (128, 1, 7, 7)
    assert causal == expected  # every key and shape, nothing else
    n = sum(torch.Size(s).numel() for s in causal.values())
    assert n == 66_110_931  # icefall's streaming Zipformer-M (RESULTS.md)
    assert n - sum(torch.Size(s).numel() for s in plain.values()) == 66_110_931 - 65_549_011
    # and the parameters are those tensors (no buffers)
    with torch.device("meta"):
        m = Transducer.from_preset("M", vocab_size=500, causal=True)
    assert sum(p.numel() for p in m.parameters()) == 66_110_931
    assert len(list(m.buffers())) == 0


# -- a short causal training -------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    from helpers import build_tiny_corpus

    from zipasr.train.config import TrainConfig
    from zipasr.train.trainer import Trainer

    root = tmp_path_factory.mktemp("causal")
    corpus = build_tiny_corpus(root / "corpus", 8)
    model_cfg = {"preset": "xs", "causal": True, "chunk_size": list(ICEFALL_CHUNKS),
                 "left_context_frames": list(ICEFALL_LEFTS)}
    train = {"num_epochs": 1, "max_duration": 3, "num_buckets": 2, "num_workers": 0,
             "log_interval": 1, "save_every_n": 2, "average_period": 1, "keep_last_k": 2,
             "lr_batches": 20, "lr_epochs": 1, "warm_step": 10, "min_cut_duration": 0.5,
             "device": "cpu", "spec_augment": False}
    draws: list[tuple[bool, tuple[int, int]]] = []
    orig = Zipformer2.get_chunk_info

    def get_chunk_info(self: Zipformer2) -> tuple[int, int]:
        out = orig(self)
        draws.append((self.training, out))
        return out

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Zipformer2, "get_chunk_info", get_chunk_info)
        summary = Trainer(TrainConfig.from_dict(train), model_cfg, train_cuts=[corpus["train"]],
                          valid_cuts=[corpus["dev"]], bpe_model=corpus["bpe"],
                          exp_dir=root / "exp", progress=False).run()
    yield {"exp": root / "exp", "summary": summary, "draws": draws}


def test_trainer_trains_a_causal_model(trained: dict[str, Any]) -> None:
    summary, draws = trained["summary"], trained["draws"]
    assert summary["batch_idx_train"] >= 2
    # one draw per training forward, chunked ones among them (the random stream decides which)
    train_draws = [d for t, d in draws if t]
    assert len(train_draws) == summary["batch_idx_train"]
    assert any(c != -1 for c, _ in train_draws)
    assert all(c in ICEFALL_CHUNKS for c, _ in train_draws)


@pytest.mark.parametrize("name", ["epoch-1.pt", "checkpoint-2.pt"])
def test_causal_checkpoint_says_so_and_loads_strictly(trained: dict[str, Any],
                                                      name: str) -> None:
    from zipasr.decode.model import load_model

    path = trained["exp"] / name
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    mc = ckpt["model_config"]
    assert mc["causal"] is True
    assert tuple(mc["chunk_size"]) == ICEFALL_CHUNKS
    assert tuple(mc["left_context_frames"]) == ICEFALL_LEFTS
    assert any(k.endswith("depthwise_conv.chunkwise_conv_scale") for k in ckpt["model"])
    model = load_model(path)  # load_state_dict(strict=True) inside
    assert model.encoder.causal and not model.training
    assert model.encoder.chunk_size == list(ICEFALL_CHUNKS)
    assert model.encoder.left_context_frames == list(ICEFALL_LEFTS)
    sd = model.state_dict()
    assert sd.keys() == ckpt["model"].keys()
    assert all(torch.equal(sd[k], v) for k, v in ckpt["model"].items())
