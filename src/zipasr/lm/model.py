"""The neural LM: an LSTM over BPE token ids, with icefall's RnnLmModel parameter layout.

Parameter names and shapes are icefall's (``input_embedding``, ``rnn`` a batch-first LSTM,
``output_linear``), so the ``model`` state dict of an icefall RNN-LM checkpoint loads strictly.
A sentence is fed as ``<sos/eos>`` + tokens and predicts tokens + ``<sos/eos>``; padding is id 0
(the blank, never a real token).

For search, :meth:`RnnLm.start` and :meth:`RnnLm.score_tokens` advance N independent histories
one token at a time; a state is ``(h, c)``, each ``(num_layers, N, hidden_dim)``, so rows can be
picked (:func:`select_state`) and joined (:func:`stack_states`) as hypotheses are pruned.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from zipasr.errors import ZipasrError

log = logging.getLogger(__name__)

BLANK_ID = 0    # padding; never predicted
SOS_EOS_ID = 1  # starts every input row, ends every target row

State = tuple[torch.Tensor, torch.Tensor]  # (h, c), each (num_layers, N, hidden_dim)


@dataclass
class RnnLmConfig:
    vocab_size: int
    embedding_dim: int = 256
    hidden_dim: int = 256
    num_layers: int = 2
    tie_weights: bool = True

    def __post_init__(self) -> None:
        for k in ("vocab_size", "embedding_dim", "hidden_dim", "num_layers"):
            if int(getattr(self, k)) < 1:
                raise ZipasrError(f"RNN-LM {k} must be positive, not {getattr(self, k)}")
        if self.vocab_size <= SOS_EOS_ID:
            raise ZipasrError(f"RNN-LM vocab_size {self.vocab_size} leaves no room for tokens "
                              f"after <blk>=0 and <sos/eos>=1")
        if self.tie_weights and self.embedding_dim != self.hidden_dim:
            # the output layer reuses the embedding matrix: (vocab, embedding) as (vocab, hidden)
            raise ZipasrError(f"tied RNN-LM weights need embedding_dim == hidden_dim, not "
                              f"{self.embedding_dim} and {self.hidden_dim}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RnnLmConfig:
        unknown = sorted(set(d) - set(cls.__dataclass_fields__))
        if unknown:
            raise ZipasrError(f"unknown RNN-LM option(s): {', '.join(unknown)}")
        return cls(**d)


class RnnLm(nn.Module):
    """LSTM language model over token ids 0..vocab_size-1."""

    def __init__(self, config: RnnLmConfig) -> None:
        super().__init__()
        self.config = config
        self.vocab_size = config.vocab_size
        self.input_embedding = nn.Embedding(config.vocab_size, config.embedding_dim)
        self.rnn = nn.LSTM(input_size=config.embedding_dim, hidden_size=config.hidden_dim,
                           num_layers=config.num_layers, batch_first=True)
        self.output_linear = nn.Linear(config.hidden_dim, config.vocab_size)
        if config.tie_weights:
            self.output_linear.weight = self.input_embedding.weight

    def forward(self, x: torch.Tensor, y: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Negative log-likelihood of each target token.

        Args:
          x: (N, L) inputs, each row ``<sos/eos>`` + tokens, padded with 0.
          y: (N, L) targets, each row tokens + ``<sos/eos>``, padded with 0.
          lengths: (N,) tokens + 1 per row (the unpadded length of x and y).
        Returns:
          (N, L) nll in nats, 0 at padding positions.
        """
        if x.shape != y.shape or x.ndim != 2 or lengths.shape != (x.size(0),):
            raise ValueError(f"x {tuple(x.shape)}, y {tuple(y.shape)}, lengths "
                             f"{tuple(lengths.shape)}: expected (N, L), (N, L), (N,)")
        out, _ = self.rnn(self.input_embedding(x))
        logits = self.output_linear(out)  # (N, L, V)
        nll = F.cross_entropy(logits.reshape(-1, self.vocab_size), y.reshape(-1),
                              reduction="none").reshape(y.shape)
        pad = torch.arange(x.size(1), device=x.device)[None, :] >= lengths.to(x.device)[:, None]
        return nll.masked_fill(pad, 0.0)

    def init_state(self, batch_size: int, device: torch.device | str | None = None) -> State:
        """The all-zero state before any input (as ``nn.LSTM``'s default)."""
        p = self.output_linear.bias
        shape = (self.config.num_layers, batch_size, self.config.hidden_dim)
        z = torch.zeros(shape, dtype=p.dtype, device=device if device is not None else p.device)
        return z, z.clone()

    def start(self, batch_size: int, device: torch.device | str | None = None
              ) -> tuple[torch.Tensor, State]:
        """The distribution of the first token, for ``batch_size`` fresh histories.

        Returns:
          log_probs (N, V) (natural log) after feeding ``<sos/eos>``, and the state (h, c).
        """
        state = self.init_state(batch_size, device)
        sos = torch.full((batch_size,), SOS_EOS_ID, dtype=torch.long, device=state[0].device)
        return self.score_tokens(sos, state)

    def score_tokens(self, tokens: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        """Feed one token to each of N independent histories.

        Args:
          tokens: (N,) token ids, the newest token of each history.
          state: (h, c), each (num_layers, N, hidden_dim), the histories before ``tokens``.
        Returns:
          log_probs (N, V) of the next token (natural log), and the new state.
        """
        if tokens.ndim != 1 or state[0].size(1) != tokens.size(0):
            raise ValueError(f"tokens {tuple(tokens.shape)} and state "
                             f"{tuple(state[0].shape)}: expected (N,) and (layers, N, hidden)")
        out, new_state = self.rnn(self.input_embedding(tokens[:, None]), state)
        return self.output_linear(out[:, 0]).log_softmax(dim=-1), new_state

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())  # a tied matrix counts once


def select_state(state: State, index: torch.Tensor | list[int]) -> State:
    """Rows ``index`` of a state (a hypothesis kept, or copied to several extensions)."""
    index = torch.as_tensor(index, dtype=torch.long, device=state[0].device)
    return state[0].index_select(1, index), state[1].index_select(1, index)


def stack_states(states: list[State]) -> State:
    """Join states of N1, N2, ... histories into one of N1 + N2 + ... (in that order)."""
    if not states:
        raise ValueError("stack_states needs at least one state")
    return torch.cat([s[0] for s in states], dim=1), torch.cat([s[1] for s in states], dim=1)


def _infer_config(state: dict[str, torch.Tensor], path: Path) -> RnnLmConfig:
    """An icefall RNN-LM's dimensions from its state dict's shapes (tied: the output matrix
    equals the embedding)."""
    try:
        vocab, emb = state["input_embedding.weight"].shape
        hidden = state["rnn.weight_hh_l0"].shape[1]
        layers = sum(1 for k in state if k.startswith("rnn.weight_ih_l"))
        tied = emb == hidden and torch.equal(state["output_linear.weight"],
                                             state["input_embedding.weight"])
    except (KeyError, ValueError) as e:
        raise ZipasrError(f"{path}: not an RNN-LM state dict (input_embedding, rnn, "
                          f"output_linear): {e}") from None
    cfg = RnnLmConfig(vocab_size=vocab, embedding_dim=emb, hidden_dim=hidden,
                      num_layers=layers, tie_weights=tied)
    log.info("%s: no lm_config; dimensions from the weights: %s", path, cfg.to_dict())
    return cfg


def load_rnn_lm(path: Path, device: torch.device | str = "cpu",
                config: RnnLmConfig | dict[str, Any] | None = None) -> RnnLm:
    """An RNN-LM in eval mode from ``lm.pt`` or ``epoch-N.pt`` of ``zipasr train-lm``, or from an
    icefall RNN-LM ``pretrained.pt``/``epoch-N.pt`` (its ``model`` state dict). ``config``
    overrides the file's ``lm_config``; without either, the dimensions come from the weights."""
    from zipasr.train.checkpoint import load_checkpoint

    path = Path(path)
    c = load_checkpoint(path, required=("model",), map_location="cpu")
    if isinstance(config, dict):
        config = RnnLmConfig.from_dict(config)
    if config is None:
        config = (RnnLmConfig.from_dict(c["lm_config"]) if "lm_config" in c
                  else _infer_config(c["model"], path))
    model = RnnLm(config)
    try:
        model.load_state_dict(c["model"], strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        raise ZipasrError(f"{path}: the weights do not fit the RNN-LM {config.to_dict()}: "
                          f"{' '.join(first[:3])}") from None
    return model.to(device).eval()
