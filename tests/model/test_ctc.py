"""The CTC head's loss against independent references, and its place in the training loss.

``Transducer.forward_ctc`` calls ``torch.nn.functional.ctc_loss``; what can go wrong is the
wiring around it: the log-softmax over the vocabulary (not time), the (T, N, V) layout it
expects, blank id 0, the encoder's output lengths (padded frames must not count), the targets
concatenated without their padding, and the reduction (a sum over utterances, as icefall's
``AsrModel.forward_ctc``; "mean" would divide each utterance by its target length).

* The loss of ``forward_ctc`` on a ragged batch equals a brute-force float64 CTC: the
  probability of a target summed over every one of the V^T frame labellings that collapse to it
  (merge repeats, drop blanks), on log-probs normalised over the vocabulary here, from the head's
  own Linear. N, T and V are all different, so a layout mix-up cannot go unnoticed.
* The CTC loss the whole model returns (``forward`` with ``use_ctc``) equals
  ``torch.nn.functional.ctc_loss`` called directly on the head's log-probs with the padded
  (N, S) targets, and the brute force.
* The Trainer adds ``ctc_loss_scale`` x the CTC loss to the transducer losses: its loss value,
  and the gradient of the CTC head's weights (which only the CTC loss reaches) being exactly
  ``ctc_loss_scale`` times the CTC loss's own gradient. A CTC-only model's loss is
  ``ctc_loss_scale`` x the CTC loss, as in icefall.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from zipasr.model import Transducer
from zipasr.train.config import TrainConfig
from zipasr.train.trainer import Trainer, loss_scales

V = 5  # blank 0 + 4 tokens: 5**6 = 15,625 labellings of the longest utterance
# Features of 30, 26 and 22 frames -> 6, 5 and 4 encoder frames; N = 3 != T = 6 != V = 5.
X_LENS = torch.tensor([30, 26, 22])
# A repeated token (needs a blank between its two frames) and different target lengths.
TARGETS = [[1, 2, 2], [3, 1], [4]]


def brute_force_ctc_nll(log_probs: torch.Tensor, target: list[int], blank: int = 0) -> float:
    """-log sum over all labellings of the T frames that collapse to ``target``.
    log_probs: (T, V) float64, one utterance's valid frames only."""
    T, num_labels = log_probs.shape
    paths = torch.tensor(list(itertools.product(range(num_labels), repeat=T)))  # (V^T, T)
    scores = log_probs.gather(1, paths.T).sum(0)  # (V^T,) log-prob of each labelling
    keep = []
    for path in paths.tolist():
        collapsed = [k for i, k in enumerate(path) if k != blank and (i == 0 or k != path[i - 1])]
        keep.append(collapsed == target)
    return -torch.logsumexp(scores[torch.tensor(keep)], dim=0).item()


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny float64 tensors: threads only add synchronisation (20x slower on 2 busy cores)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def model() -> Transducer:
    """The xs model with both heads, in float64 and eval mode (no dropout: the loss is a
    deterministic function of the input), weights jittered so frames differ."""
    torch.manual_seed(0)
    m = Transducer.from_preset("xs", vocab_size=V, use_ctc=True).double()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.05)
    return m.eval()


@pytest.fixture(scope="module")
def features() -> torch.Tensor:
    g = torch.Generator().manual_seed(2)
    return torch.randn(3, int(X_LENS.max()), 80, generator=g, dtype=torch.float64)


def _encoder(model: Transducer, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        enc, lens = model.forward_encoder(x, X_LENS)
    assert lens.tolist() == [6, 5, 4] and enc.shape[:2] == (3, 6)
    return enc, lens


def _reference_log_probs(model: Transducer, enc: torch.Tensor) -> torch.Tensor:
    """(N, T, V) log-probs normalised over the vocabulary here, from the head's Linear."""
    logits = model.ctc_output[1](enc)
    return logits - logits.logsumexp(dim=-1, keepdim=True)


def _brute_force_batch(log_probs: torch.Tensor, lens: torch.Tensor,
                       targets: list[list[int]]) -> float:
    return sum(brute_force_ctc_nll(log_probs[n, : lens[n]], y)
               for n, y in enumerate(targets))


def test_brute_force_reference_on_known_cases() -> None:
    """The reference itself on cases small enough to count by hand."""
    lp = torch.log(torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3]], dtype=torch.float64))
    # target [1] over 2 frames: labellings 1-1, 1-blank, blank-1
    p = 0.3 * 0.6 + 0.3 * 0.1 + 0.5 * 0.6
    assert brute_force_ctc_nll(lp, [1]) == pytest.approx(-math.log(p), rel=1e-14)
    # [1, 1] over 2 frames is impossible (a repeat needs a blank between): no labelling
    assert brute_force_ctc_nll(lp, [1, 1]) == math.inf
    assert brute_force_ctc_nll(lp, [1, 2]) == pytest.approx(-math.log(0.3 * 0.3), rel=1e-14)


def test_forward_ctc_matches_brute_force(model: Transducer, features: torch.Tensor) -> None:
    enc, lens = _encoder(model, features)
    ref_lp = _reference_log_probs(model, enc)
    with torch.no_grad():
        # the head's LogSoftmax normalises over the vocabulary: the same log-probs
        torch.testing.assert_close(model.ctc_output(enc), ref_lp, rtol=0, atol=1e-12)
        flat = torch.tensor([k for y in TARGETS for k in y])
        got = model.forward_ctc(enc, lens, flat, torch.tensor([len(y) for y in TARGETS]))
    want = _brute_force_batch(ref_lp, lens, TARGETS)
    assert got.ndim == 0 and got.dtype == torch.float64
    assert got.item() == pytest.approx(want, rel=1e-10)

    # padded frames do not count: garbage there changes nothing
    garbage = enc.clone()
    for n, length in enumerate(lens.tolist()):
        garbage[n, length:] = 1e3 * torch.randn_like(garbage[n, length:])
    with torch.no_grad():
        again = model.forward_ctc(garbage, lens, flat, torch.tensor([len(y) for y in TARGETS]))
    assert again.item() == pytest.approx(want, rel=1e-10)


def test_model_ctc_loss_matches_torch_ctc_loss(model: Transducer,
                                               features: torch.Tensor) -> None:
    """forward() with use_ctc, targets as token lists and as (padded, lengths), against
    F.ctc_loss on the head's log-probs with (N, S) targets padded with a non-blank token."""
    enc, lens = _encoder(model, features)
    S = max(len(y) for y in TARGETS)
    y_lens = torch.tensor([len(y) for y in TARGETS])
    with torch.no_grad():
        log_probs = model.ctc_output(enc)  # (N, T, V)
        # padded with token 3: ctc_loss must read only the first y_lens of each row
        padded = torch.tensor([y + [3] * (S - len(y)) for y in TARGETS])
        direct = F.ctc_loss(log_probs.transpose(0, 1), padded, lens, y_lens, blank=0,
                            reduction="sum")
        _, _, from_lists = model(features, X_LENS, TARGETS)
        zero_padded = torch.tensor([y + [0] * (S - len(y)) for y in TARGETS])
        _, _, from_padded = model(features, X_LENS, (zero_padded, y_lens))
    want = _brute_force_batch(_reference_log_probs(model, enc), lens, TARGETS)
    assert direct.item() == pytest.approx(want, rel=1e-10)
    assert from_lists.item() == pytest.approx(direct.item(), rel=1e-10)
    assert from_padded.item() == pytest.approx(direct.item(), rel=1e-10)
    # "mean" (per-utterance loss / target length, averaged) is not what icefall sums
    mean = F.ctc_loss(log_probs.transpose(0, 1), padded, lens, y_lens, reduction="mean")
    assert abs(mean.item() - from_lists.item()) > 1.0


class _LossOnly(Trainer):
    """What Trainer._losses reads, without data, checkpoints or an optimizer."""

    def __init__(self, model: Transducer, ctc_loss_scale: float, batch_idx_train: int) -> None:
        self.cfg = TrainConfig.from_dict({"ctc_loss_scale": ctc_loss_scale, "warm_step": 100})
        self.state = SimpleNamespace(model=model, ddp=None, batch_idx_train=batch_idx_train)
        self.device = torch.device("cpu")
        self.sp = _Tokens()
        self.autocast_dtype = None
        self.joiner_bf16 = False


class _Tokens:
    """A stand-in for the sentencepiece model: "1 2 2" -> [1, 2, 2]."""

    @staticmethod
    def encode(texts: list[str]) -> list[list[int]]:
        return [[int(t) for t in text.split()] for text in texts]


def _batch(features: torch.Tensor) -> dict:
    return {"inputs": features, "supervisions": {
        "num_frames": X_LENS, "text": [" ".join(map(str, y)) for y in TARGETS]}}


@pytest.mark.parametrize("ctc_loss_scale,batch_idx", [(0.2, 0), (0.2, 40), (0.7, 500)])
def test_trainer_adds_scaled_ctc_loss(model: Transducer, features: torch.Tensor,
                                      ctc_loss_scale: float, batch_idx: int) -> None:
    t = _LossOnly(model, ctc_loss_scale, batch_idx)
    model.zero_grad()
    loss, info = t._losses(_batch(features))
    loss.backward()
    head_grad = {n: p.grad.clone() for n, p in model.ctc_output.named_parameters()}

    # the same losses from the model directly
    model.zero_grad()
    simple, pruned, ctc = model(features, X_LENS, TARGETS, prune_range=t.cfg.prune_range,
                                am_scale=t.cfg.am_scale, lm_scale=t.cfg.lm_scale)
    s, p = loss_scales(batch_idx, t.cfg.warm_step, t.cfg.simple_loss_scale)
    want = s * simple.item() + p * pruned.item() + ctc_loss_scale * ctc.item()
    assert loss.item() == pytest.approx(want, rel=1e-10)
    assert info["ctc_loss"] == pytest.approx(ctc.item(), rel=1e-12)

    # only the CTC loss reaches the CTC head: its gradient is exactly the scaled CTC gradient
    ctc.backward()
    for n, prm in model.ctc_output.named_parameters():
        assert prm.grad.abs().max() > 0
        torch.testing.assert_close(head_grad[n], ctc_loss_scale * prm.grad, rtol=1e-10,
                                   atol=1e-14)
    model.zero_grad()


def test_trainer_ctc_only_model_scales_its_ctc_loss(features: torch.Tensor) -> None:
    """With no transducer the loss is ctc_loss_scale x the CTC loss, as in icefall (which
    scales it whether or not there is a transducer)."""
    torch.manual_seed(0)
    m = Transducer.from_preset("xs", vocab_size=V, use_ctc=True,
                               use_transducer=False).double().eval()
    loss, info = _LossOnly(m, 0.2, 0)._losses(_batch(features))
    with torch.no_grad():
        _, _, ctc = m(features, X_LENS, TARGETS)
    assert "simple_loss" not in info
    assert loss.item() == pytest.approx(0.2 * ctc.item(), rel=1e-12)
