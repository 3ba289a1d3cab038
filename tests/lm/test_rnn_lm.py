"""RnnLm: icefall's parameter layout, step-by-step scoring against the whole-sentence forward
and against the LSTM equations written out, state rows, loading icefall-style checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from zipasr.errors import ZipasrError
from zipasr.lm.model import RnnLm, RnnLmConfig, load_rnn_lm, select_state, stack_states


def _model(tie: bool = False, layers: int = 2, seed: int = 0) -> RnnLm:
    torch.manual_seed(seed)
    emb, hidden = (6, 6) if tie else (5, 7)
    return RnnLm(RnnLmConfig(vocab_size=11, embedding_dim=emb, hidden_dim=hidden,
                             num_layers=layers, tie_weights=tie)).double()


def test_icefall_state_dict_layout() -> None:
    m = _model(tie=False)
    shapes = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    expected = {"input_embedding.weight": (11, 5), "output_linear.weight": (11, 7),
                "output_linear.bias": (11,)}
    for layer, inp in ((0, 5), (1, 7)):
        expected |= {f"rnn.weight_ih_l{layer}": (28, inp), f"rnn.weight_hh_l{layer}": (28, 7),
                     f"rnn.bias_ih_l{layer}": (28,), f"rnn.bias_hh_l{layer}": (28,)}
    assert shapes == expected
    tied = _model(tie=True)
    assert tied.output_linear.weight is tied.input_embedding.weight
    assert "output_linear.weight" in tied.state_dict()  # icefall's tied files hold both keys
    with pytest.raises(ZipasrError, match="embedding_dim == hidden_dim"):
        RnnLmConfig(vocab_size=11, embedding_dim=5, hidden_dim=7, tie_weights=True)


def _lstm_by_hand(m: RnnLm, tokens: list[int]) -> list[torch.Tensor]:
    """Log-probs after each of ``tokens`` from the LSTM equations (gates i, f, g, o)."""
    sd = m.state_dict()
    layers, hidden = m.config.num_layers, m.config.hidden_dim
    h = [torch.zeros(hidden, dtype=torch.float64) for _ in range(layers)]
    c = [torch.zeros(hidden, dtype=torch.float64) for _ in range(layers)]
    out = []
    for t in tokens:
        x = sd["input_embedding.weight"][t]
        for k in range(layers):
            z = (sd[f"rnn.weight_ih_l{k}"] @ x + sd[f"rnn.bias_ih_l{k}"]
                 + sd[f"rnn.weight_hh_l{k}"] @ h[k] + sd[f"rnn.bias_hh_l{k}"])
            i, f, g, o = z.split(hidden)
            c[k] = torch.sigmoid(f) * c[k] + torch.sigmoid(i) * torch.tanh(g)
            h[k] = torch.sigmoid(o) * torch.tanh(c[k])
            x = h[k]
        logits = sd["output_linear.weight"] @ x + sd["output_linear.bias"]
        out.append(logits - torch.logsumexp(logits, 0))
    return out


@pytest.mark.parametrize("tie", [False, True])
def test_stepwise_scores_equal_forward_and_the_equations(tie: bool) -> None:
    m = _model(tie=tie)
    sents = [[4, 7, 2, 9], [3], [10, 10, 5]]
    x = torch.zeros(3, 5, dtype=torch.long)
    y = torch.zeros(3, 5, dtype=torch.long)
    for r, s in enumerate(sents):
        x[r, :len(s) + 1] = torch.tensor([1, *s])
        y[r, :len(s) + 1] = torch.tensor([*s, 1])
    lengths = torch.tensor([len(s) + 1 for s in sents])
    with torch.no_grad():
        _check_steps(m, sents, m(x, y, lengths))


def _check_steps(m: RnnLm, sents: list[list[int]], nll: torch.Tensor) -> None:
    """``nll`` (N, L) of the whole sentences against one token at a time and the equations."""
    assert nll.shape == (3, 5)
    assert (nll[1, 2:] == 0).all() and (nll[2, 4:] == 0).all()  # padding

    # step by step, the three sentences as three independent histories
    log_probs, state = m.start(3)
    steps = [log_probs]
    for pos in range(4):
        tokens = torch.tensor([s[pos] if pos < len(s) else 2 for s in sents])
        log_probs, state = m.score_tokens(tokens, state)
        steps.append(log_probs)
    for r, s in enumerate(sents):
        hand = _lstm_by_hand(m, [1, *s])
        total = 0.0
        for pos, target in enumerate([*s, 1]):
            lp = steps[pos][r]
            torch.testing.assert_close(lp, hand[pos], rtol=0, atol=1e-12)
            assert abs(float(-lp[target] - nll[r, pos])) < 1e-12
            total += float(lp[target])
        assert abs(total + float(nll[r].sum())) < 1e-12


def test_select_and_stack_states_follow_their_rows() -> None:
    m = _model()
    _, state = m.start(3)
    lp, state = m.score_tokens(torch.tensor([4, 5, 6]), state)
    picked = select_state(state, [2, 0])
    lp2, _ = m.score_tokens(torch.tensor([7, 7]), picked)
    ref0, _ = m.score_tokens(torch.tensor([7, 7, 7]), state)
    torch.testing.assert_close(lp2, ref0[[2, 0]], rtol=0, atol=1e-12)
    joined = stack_states([select_state(state, [1]), select_state(state, [0, 2])])
    assert joined[0].shape == (2, 3, 7)
    torch.testing.assert_close(joined[1], state[1][:, [1, 0, 2]], rtol=0, atol=0)


def test_load_icefall_checkpoint(tmp_path: Path) -> None:
    m = _model(tie=True).float()
    x = torch.tensor([[1, 4, 5]])
    ref = m(x, torch.tensor([[4, 5, 1]]), torch.tensor([3]))
    # icefall's epoch-N.pt: the state dict under "model" next to its params, no lm_config
    path = tmp_path / "epoch-9.pt"
    torch.save({"model": m.state_dict(), "optimizer": {}, "batch_idx_train": 7}, path)
    for cfg in (None, {"vocab_size": 11, "embedding_dim": 6, "hidden_dim": 6,
                       "num_layers": 2, "tie_weights": True}):
        got = load_rnn_lm(path, config=cfg)
        assert got.config.to_dict() == m.config.to_dict() and not got.training
        torch.testing.assert_close(got(x, torch.tensor([[4, 5, 1]]), torch.tensor([3])), ref)
    with pytest.raises(ZipasrError, match="do not fit the RNN-LM"):
        load_rnn_lm(path, config={"vocab_size": 11, "embedding_dim": 6, "hidden_dim": 6,
                                  "num_layers": 3, "tie_weights": True})
    with pytest.raises(ZipasrError, match="does not exist"):
        load_rnn_lm(tmp_path / "nothing.pt")
