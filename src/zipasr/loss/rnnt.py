"""k2's RNN-T losses (full, simple, smoothed, pruned) and the pruning helpers.

Same names, arguments, defaults and numerics as ``k2/python/k2/rnnt_loss.py``; everything
here is plain tensor code around
``mutual_information_recursion``.  Shapes: ``B`` batch, ``T`` frames, ``S`` symbols, ``C``
classes incl. blank (= ``termination_symbol``), ``R`` prune range.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor

from zipasr.loss.log_softmax_pick import log_softmax_pick
from zipasr.loss.mutual_information import mutual_information_recursion

log = logging.getLogger(__name__)

RNNT_TYPES = ("regular", "modified", "constrained")


def _check_rnnt_type(rnnt_type: str) -> None:
    if rnnt_type not in RNNT_TYPES:
        raise ValueError(f"rnnt_type must be one of {RNNT_TYPES}, got {rnnt_type!r}")


def _check_frames_ge_symbols(rnnt_type: str, S: int, T: int, boundary: Tensor | None) -> None:
    """Modified/constrained emit at most one symbol per frame, so T_b >= S_b is required."""
    if rnnt_type == "regular":
        return
    if boundary is None:
        if T < S:
            raise ValueError(f"rnnt_type={rnnt_type!r} needs T >= S, got T={T}, S={S}")
    elif bool((boundary[:, 3] < boundary[:, 2]).any()):
        raise ValueError(f"rnnt_type={rnnt_type!r} needs t_end >= s_end in every boundary row")


def fix_for_boundary(px: Tensor, boundary: Tensor | None = None) -> Tensor:
    """Set ``px[b, :, t_end_b] = -inf`` in place (regular only): no symbol after the last frame.

    Args:
      px: (B, S, T+1); modified in place and returned.
      boundary: None (then column T is already -inf) or int64 (B, 4).
    """
    if boundary is None:
        return px
    B, S, T1 = px.shape
    index = boundary[:, 3].reshape(B, 1, 1).expand(B, S, 1).to(px.device)
    return px.scatter_(2, index, float("-inf"))


def _neg_inf_column(px: Tensor) -> Tensor:
    """Append the regular topology's column ``t = T`` of -inf: (B, S, T) -> (B, S, T+1)."""
    B, S, _ = px.shape
    return torch.cat([px, px.new_full((B, S, 1), float("-inf"))], dim=2)


def _finish_px(px: Tensor, py: Tensor, boundary: Tensor | None, rnnt_type: str) -> Tensor:
    """Topology-specific tail shared by all log-prob builders (k2 order)."""
    if rnnt_type == "regular":
        px = fix_for_boundary(px, boundary)
    elif rnnt_type == "constrained":
        # an emission on frame t must be followed by the next context's blank on that frame
        px = px + py[:, 1:, :]
    return px


def _apply_delay_penalty(px: Tensor, boundary: Tensor | None, rnnt_type: str,
                         delay_penalty: float) -> Tensor:
    """``px[b, s, t] += delay_penalty * ((T_b - 1) / 2 - t)``; zero-mean over real frames."""
    B, S, T1 = px.shape
    T = T1 - 1 if rnnt_type == "regular" else T1
    if boundary is None:
        t_end = torch.full((B,), T, device=px.device, dtype=px.dtype)
    else:
        t_end = boundary[:, 3].to(device=px.device, dtype=px.dtype)
    # computed in px's dtype: identical to k2 for float32, exact for float64 (k2 forms the
    # penalty in the default float dtype first)
    t = torch.arange(T1, device=px.device, dtype=px.dtype).reshape(1, 1, T1)
    penalty = ((t_end - 1) / 2).reshape(B, 1, 1) - t
    return px + penalty * delay_penalty


def _reduce(negated_loss: Tensor, reduction: str | None) -> Tensor:
    if reduction == "none":
        return -negated_loss
    if reduction == "mean":
        return -torch.mean(negated_loss)
    if reduction == "sum":
        return -torch.sum(negated_loss)
    raise ValueError(f"reduction should be ('none' | 'mean' | 'sum'), given {reduction}")


def _run(px: Tensor, py: Tensor, boundary: Tensor | None, rnnt_type: str, delay_penalty: float,
         reduction: str | None, return_grad: bool):
    if delay_penalty > 0.0:
        px = _apply_delay_penalty(px, boundary, rnnt_type, delay_penalty)
    out = mutual_information_recursion(px=px, py=py, boundary=boundary, return_grad=return_grad)
    if return_grad:
        scores, grads = out
        return _reduce(scores, reduction), grads
    return _reduce(out, reduction)


# ----------------------------------------------------------------------------------------------
# simple / smoothed (joiner = addition)


def _simple_parts(lm: Tensor, am: Tensor, symbols: Tensor, termination_symbol: int):
    """Shared pieces of the simple and smoothed log-probs.

    Returns ``px_am (B,S,T)``, ``px_lm (B,S,1)``, ``py_am (B,1,T)``, ``py_lm (B,S+1,1)``,
    ``normalizers (B,S+1,T)``, ``am_probs``, ``lm_probs`` (max-shifted exps), ``am_max``,
    ``lm_max``.
    """
    if lm.ndim != 3 or am.ndim != 3 or lm.shape[0] != am.shape[0] or lm.shape[2] != am.shape[2]:
        raise ValueError(f"lm (B,S+1,C) and am (B,T,C) mismatch: {tuple(lm.shape)}, "
                         f"{tuple(am.shape)}")
    B, T, C = am.shape
    S = lm.shape[1] - 1
    if tuple(symbols.shape) != (B, S):
        raise ValueError(f"symbols must have shape {(B, S)}, got {tuple(symbols.shape)}")
    am_max = am.max(dim=2, keepdim=True).values  # (B, T, 1)
    lm_max = lm.max(dim=2, keepdim=True).values  # (B, S+1, 1)
    am_probs = (am - am_max).exp()
    lm_probs = (lm - lm_max).exp()
    # log sum_c exp(lm + am) without the (B, T, S+1, C) tensor: one batched matmul
    normalizers = (torch.matmul(lm_probs, am_probs.transpose(1, 2))
                   + torch.finfo(am_probs.dtype).tiny).log()
    normalizers = normalizers + lm_max + am_max.transpose(1, 2)  # (B, S+1, T)
    # gather on am itself (not on a (B, S, T, C) expansion, whose backward would allocate and
    # zero-fill that whole tensor); same values
    px_am = torch.gather(am, 2, symbols.unsqueeze(1).expand(B, T, S)).transpose(1, 2)
    px_lm = torch.gather(lm[:, :S], 2, symbols.unsqueeze(-1))  # (B, S, 1)
    py_am = am[:, :, termination_symbol].unsqueeze(1)  # (B, 1, T)
    py_lm = lm[:, :, termination_symbol].unsqueeze(2)  # (B, S+1, 1)
    return px_am, px_lm, py_am, py_lm, normalizers, am_probs, lm_probs, am_max, lm_max


def get_rnnt_logprobs(
    lm: Tensor, am: Tensor, symbols: Tensor, termination_symbol: int,
    boundary: Tensor | None = None, rnnt_type: str = "regular",
) -> tuple[Tensor, Tensor]:
    """px/py of the simple (additive-joiner) model.

    Args:
      lm: (B, S+1, C); am: (B, T, C); symbols: int64 (B, S).
    Returns:
      px: (B, S, T+1) regular, (B, S, T) modified/constrained; py: (B, S+1, T).
    """
    _check_rnnt_type(rnnt_type)
    B, T, C = am.shape
    S = lm.shape[1] - 1
    _check_frames_ge_symbols(rnnt_type, S, T, boundary)
    px_am, px_lm, py_am, py_lm, norm, *_ = _simple_parts(lm, am, symbols, termination_symbol)
    if rnnt_type == "regular":
        px_am = _neg_inf_column(px_am)
    px = px_am + px_lm
    px[:, :, :T] -= norm[:, :S, :]
    py = py_am + py_lm - norm
    return _finish_px(px, py, boundary, rnnt_type), py


def rnnt_loss_simple(
    lm: Tensor, am: Tensor, symbols: Tensor, termination_symbol: int,
    boundary: Tensor | None = None, rnnt_type: str = "regular", delay_penalty: float = 0.0,
    reduction: str | None = "mean", return_grad: bool = False,
) -> Tensor | tuple[Tensor, tuple[Tensor, Tensor]]:
    """RNN-T loss of the additive joiner ``logits = am[b,t] + lm[b,s]``.

    Args:
      lm: (B, S+1, C); am: (B, T, C); symbols: int64 (B, S); boundary: int64 (B, 4) or None.
      return_grad: also return (px_grad, py_grad), d(-loss_b)/d px, py for reduction "none".
    Returns:
      loss (B,) or scalar; with ``return_grad`` ``(loss, (px_grad, py_grad))``.
    """
    px, py = get_rnnt_logprobs(lm, am, symbols, termination_symbol, boundary, rnnt_type)
    return _run(px, py, boundary, rnnt_type, delay_penalty, reduction, return_grad)


def get_rnnt_logprobs_smoothed(
    lm: Tensor, am: Tensor, symbols: Tensor, termination_symbol: int,
    lm_only_scale: float = 0.1, am_only_scale: float = 0.1,
    boundary: Tensor | None = None, rnnt_type: str = "regular",
) -> tuple[Tensor, Tensor]:
    """px/py interpolating (in log space) the combined, LM-only and AM-only models.

    Shapes as :func:`get_rnnt_logprobs`.  The AM-only model uses a unigram of the LM averaged
    over all B*(S+1) rows, padding included (k2 behaviour).
    """
    _check_rnnt_type(rnnt_type)
    B, T, C = am.shape
    S = lm.shape[1] - 1
    _check_frames_ge_symbols(rnnt_type, S, T, boundary)
    px_am, px_lm, py_am, py_lm, norm, am_probs, lm_probs, am_max, lm_max = _simple_parts(
        lm, am, symbols, termination_symbol)
    tiny = torch.finfo(lm_probs.dtype).tiny
    lm_sums = lm_probs.sum(dim=2, keepdim=True)  # (B, S+1, 1)
    unigram = (lm_probs / lm_sums).mean(dim=(0, 1)) + tiny  # (C,)
    am_only_norm = (torch.mv(am_probs.reshape(-1, C), unigram).reshape(B, T, 1).log()
                    + am_max).transpose(1, 2)  # (B, 1, T)
    log_unigram = unigram.log()
    lm_only_norm = lm_sums.log() + lm_max  # (B, S+1, 1)

    if rnnt_type == "regular":
        px_am = _neg_inf_column(px_am)
    px = px_am + px_lm
    px[:, :, :T] -= norm[:, :S, :]
    px_am_only = px_am + log_unigram[symbols].unsqueeze(-1)
    px_am_only[:, :, :T] -= am_only_norm
    px_lm_only = px_lm - lm_only_norm[:, :S, :]

    py = py_am + py_lm - norm
    py_am_only = py_am + log_unigram[termination_symbol] - am_only_norm
    py_lm_only = py_lm - lm_only_norm

    combined_scale = 1.0 - lm_only_scale - am_only_scale
    # an exact 0 would turn the structural -inf entries into 0 * -inf = NaN
    lm_only_scale = lm_only_scale if lm_only_scale != 0.0 else 1.0e-20
    am_only_scale = am_only_scale if am_only_scale != 0.0 else 1.0e-20
    px = px * combined_scale + px_lm_only * lm_only_scale + px_am_only * am_only_scale
    py = py * combined_scale + py_lm_only * lm_only_scale + py_am_only * am_only_scale
    return _finish_px(px, py, boundary, rnnt_type), py


def rnnt_loss_smoothed(
    lm: Tensor, am: Tensor, symbols: Tensor, termination_symbol: int,
    lm_only_scale: float = 0.1, am_only_scale: float = 0.1,
    boundary: Tensor | None = None, rnnt_type: str = "regular", delay_penalty: float = 0.0,
    reduction: str | None = "mean", return_grad: bool = False,
) -> Tensor | tuple[Tensor, tuple[Tensor, Tensor]]:
    """Simple loss with LM-only / AM-only smoothing (icefall: 0.25 / 0.0, ``return_grad``).

    Args and returns as :func:`rnnt_loss_simple`.
    """
    px, py = get_rnnt_logprobs_smoothed(lm, am, symbols, termination_symbol, lm_only_scale,
                                        am_only_scale, boundary, rnnt_type)
    return _run(px, py, boundary, rnnt_type, delay_penalty, reduction, return_grad)


# ----------------------------------------------------------------------------------------------
# full joiner output


def get_rnnt_logprobs_joint(
    logits: Tensor, symbols: Tensor, termination_symbol: int,
    boundary: Tensor | None = None, rnnt_type: str = "regular",
) -> tuple[Tensor, Tensor]:
    """px/py from full joiner logits (B, T, S+1, C); shapes as :func:`get_rnnt_logprobs`."""
    _check_rnnt_type(rnnt_type)
    if logits.ndim != 4:
        raise ValueError(f"logits must be (B, T, S+1, C), got {tuple(logits.shape)}")
    B, T, S1, C = logits.shape
    S = S1 - 1
    if tuple(symbols.shape) != (B, S):
        raise ValueError(f"symbols must have shape {(B, S)}, got {tuple(symbols.shape)}")
    _check_frames_ge_symbols(rnnt_type, S, T, boundary)
    norm = torch.logsumexp(logits, dim=3).permute(0, 2, 1)  # (B, S+1, T)
    px = torch.gather(logits, 3, symbols.reshape(B, 1, S, 1).expand(B, T, S, 1)).squeeze(-1)
    px = px.permute(0, 2, 1)
    if rnnt_type == "regular":
        px = _neg_inf_column(px)
    else:
        px = px.clone()
    px[:, :, :T] -= norm[:, :S, :]
    py = logits[:, :, :, termination_symbol].permute(0, 2, 1) - norm
    return _finish_px(px.contiguous(), py.contiguous(), boundary, rnnt_type), py.contiguous()


def rnnt_loss(
    logits: Tensor, symbols: Tensor, termination_symbol: int, boundary: Tensor | None = None,
    rnnt_type: str = "regular", delay_penalty: float = 0.0, reduction: str | None = "mean",
) -> Tensor:
    """Full (unpruned) RNN-T loss of joiner logits (B, T, S+1, C).

    Returns:
      (B,) for reduction "none", else a scalar.
    """
    px, py = get_rnnt_logprobs_joint(logits, symbols, termination_symbol, boundary, rnnt_type)
    return _run(px, py, boundary, rnnt_type, delay_penalty, reduction, False)


# ----------------------------------------------------------------------------------------------
# pruning


def _adjust_pruning_lower_bound(s_begin: Tensor, s_range: int) -> Tensor:
    """Make window starts (B, T) monotone with per-frame increments of at most ``s_range - 1``
    and ``s_begin[:, 0] = 0``, only ever lowering entries (k2's adjustment)."""
    # suffix minimum: monotone non-decreasing, only lowers
    x = torch.flip(torch.cummin(torch.flip(s_begin, [1]), dim=1).values, [1])
    t = torch.arange(x.shape[1], device=x.device).reshape(1, -1) * (s_range - 1)
    y = t - x
    y = torch.flip(torch.cummin(torch.flip(y, [1]), dim=1).values, [1])
    y = torch.clamp(y, min=0)
    return t - y


def get_rnnt_prune_ranges(
    px_grad: Tensor, py_grad: Tensor, boundary: Tensor, s_range: int
) -> Tensor:
    """Per-frame windows of ``R`` consecutive symbol positions holding most occupation.

    Args:
      px_grad: (B, S, T+1) regular or (B, S, T) modified/constrained occupations.
      py_grad: (B, S+1, T).
      boundary: int64 (B, 4), mandatory.
      s_range: requested window size; may be raised to ``max_b(ceil(S_b/T_b)) + 1``
        (regular, so windows can climb to S_b) and is capped at ``S + 1``.
    Returns:
      int64 (B, T, R) with ``ranges[b, t, k] = start[b, t] + k``.
    """
    B, S1, T = py_grad.shape
    S = S1 - 1
    regular = px_grad.shape[2] == T + 1
    if tuple(px_grad.shape[:2]) != (B, S) or px_grad.shape[2] not in (T, T + 1):
        raise ValueError(f"px_grad {tuple(px_grad.shape)} does not match py_grad "
                         f"{tuple(py_grad.shape)}")
    if boundary is None:
        raise ValueError("get_rnnt_prune_ranges needs boundary")
    boundary = boundary.to(py_grad.device)
    s_end = boundary[:, 2]
    t_end = boundary[:, 3]
    if regular:
        px_grad = px_grad[:, :, :T]
        # integer division like k2 (t_end == 0 raises)
        s_min = int((torch.div(s_end - 1, t_end, rounding_mode="trunc") + 2).max().item())
        if s_range < s_min:
            log.warning("s_range %d is too small for this batch; using %d", s_range, s_min)
            s_range = s_min
    if s_range > S:
        s_range = S + 1
    # k2 asserts s_range >= 2 for regular; a window covering all S+1 rows (padded S = 0) is
    # also valid, so it is accepted here instead of raising.
    if not (s_range >= 2 or (s_range >= 1 and (not regular or s_range == S + 1))):
        raise ValueError(f"s_range {s_range} too small for rnnt_type "
                         f"{'regular' if regular else 'modified'}")
    R = s_range
    n_win = S1 - R + 1
    # window score: the same torch reduction as k2 (a (B, n_win, R, T) strided view summed
    # over R in the grads' dtype), so near-ties resolve exactly as in k2
    sb, ss, st = py_grad.stride()
    windows = torch.as_strided(py_grad, (B, n_win, R, T), (sb, ss, ss, st))
    score = windows.sum(dim=2)
    if n_win > 1:
        score[:, 1:, :] -= px_grad[:, 0:n_win - 1, :]
    s_begin = torch.argmax(score, dim=1)  # (B, T), first maximum on ties
    last = torch.clamp(s_end - R + 1, min=0).reshape(B, 1).expand(B, T)
    tail = torch.arange(T, device=py_grad.device).reshape(1, T) >= (t_end - 1).reshape(B, 1)
    s_begin = torch.where(tail, last, s_begin)
    s_begin = _adjust_pruning_lower_bound(s_begin, R if regular else 2)
    return s_begin.unsqueeze(-1) + torch.arange(R, device=py_grad.device)


def do_rnnt_pruning(am: Tensor, lm: Tensor, ranges: Tensor) -> tuple[Tensor, Tensor]:
    """Expand ``am`` and gather ``lm`` rows to the pruned lattice.

    Args:
      am: (B, T, D1); lm: (B, S+1, D2); ranges: int64 (B, T, R).
    Returns:
      am_pruned (B, T, R, D1) (an expanded view) and lm_pruned (B, T, R, D2).
    """
    if ranges.ndim != 3 or am.ndim != 3 or lm.ndim != 3:
        raise ValueError("am, lm and ranges must be 3-D")
    B, T, R = ranges.shape
    S1 = lm.shape[1]
    if am.shape[0] != B or am.shape[1] != T or lm.shape[0] != B:
        raise ValueError(f"shape mismatch: am {tuple(am.shape)}, lm {tuple(lm.shape)}, "
                         f"ranges {tuple(ranges.shape)}")
    if R > S1:
        raise ValueError(f"prune range {R} exceeds S+1={S1}")
    D2 = lm.shape[2]
    am_pruned = am.unsqueeze(2).expand(B, T, R, am.shape[2])
    # a flat row index out of its sequence's range would silently read a neighbour's row
    in_range = ((ranges >= 0) & (ranges < S1)).all()
    if ranges.device.type == "cpu":
        if not bool(in_range):
            raise ValueError(f"ranges must lie in [0, {S1}) (S+1 rows of lm)")
    else:
        torch._assert_async(in_range)  # no host sync
    # whole rows of the flattened (B * (S+1), D2) lm: index_select copies rows and its backward
    # (index_add) adds rows, 4-5x faster than gather/scatter_add with a per-element index, and
    # the same values (each row's gradient summed in the same order)
    rows = (ranges + torch.arange(B, device=ranges.device).reshape(B, 1, 1) * S1).reshape(-1)
    lm_pruned = lm.reshape(B * S1, D2).index_select(0, rows).reshape(B, T, R, D2)
    return am_pruned, lm_pruned


def get_rnnt_logprobs_pruned(
    logits: Tensor, symbols: Tensor, ranges: Tensor, termination_symbol: int,
    boundary: Tensor | None = None, rnnt_type: str = "regular", use_hat_loss: bool = False,
) -> tuple[Tensor, Tensor]:
    """px/py on the full (S+1) x T grid from pruned logits, -inf outside the windows.

    Args:
      logits: (B, T, R, C); symbols: int64 (B, S); ranges: int64 (B, T, R).
      use_hat_loss: HAT factorisation (blank = Bernoulli ``sigmoid(l_0)``); needs blank 0.
    Returns:
      px: (B, S, T+1) regular, (B, S, T) otherwise; py: (B, S+1, T).
    """
    _check_rnnt_type(rnnt_type)
    if logits.ndim != 4:
        raise ValueError(f"logits must be (B, T, R, C), got {tuple(logits.shape)}")
    B, T, R, C = logits.shape
    if tuple(ranges.shape) != (B, T, R):
        raise ValueError(f"ranges must have shape {(B, T, R)}, got {tuple(ranges.shape)}")
    S = symbols.shape[1]
    if symbols.shape[0] != B or R > S + 1:
        raise ValueError(f"symbols {tuple(symbols.shape)} incompatible with R={R}")
    _check_frames_ge_symbols(rnnt_type, S, T, boundary)
    ext = torch.cat([symbols, symbols.new_full((B, 1), termination_symbol)], dim=1)  # (B, S+1)
    kept = torch.gather(ext.unsqueeze(1).expand(B, T, S + 1), 2, ranges)  # (B, T, R)
    # symbol and blank picked together (one (B, T, R, C) gradient in the backward)
    index = torch.stack([kept, torch.full_like(kept, termination_symbol)], dim=-1)
    if use_hat_loss:
        if termination_symbol != 0:
            raise ValueError("use_hat_loss requires termination_symbol == 0")
        picked = torch.gather(logits, 3, index)  # (B, T, R, 2)
        sym_logit, blank_logit = picked[..., 0], picked[..., 1]
        nonblank_norm = torch.logsumexp(logits[..., 1:], dim=3)
        px_pruned = torch.nn.functional.logsigmoid(-blank_logit) + sym_logit - nonblank_norm
        py_pruned = torch.nn.functional.logsigmoid(blank_logit)
    else:
        picked = log_softmax_pick(logits, index)  # (B, T, R, 2)
        px_pruned, py_pruned = picked[..., 0], picked[..., 1]

    def scatter(vals: Tensor) -> Tensor:  # (B, T, R) -> (B, S+1, T), -inf where pruned
        full = vals.new_full((B, T, S + 1), float("-inf"))
        return full.scatter(2, ranges, vals).permute(0, 2, 1)

    # an "emission" from row S would leave the lattice; dropping row S discards it
    px = scatter(px_pruned)[:, :S, :]
    py = scatter(py_pruned).contiguous()
    if rnnt_type == "regular":
        px = _neg_inf_column(px)
    px = _finish_px(px.contiguous(), py, boundary, rnnt_type)
    return px, py


def rnnt_loss_pruned(
    logits: Tensor, symbols: Tensor, ranges: Tensor, termination_symbol: int,
    boundary: Tensor | None = None, rnnt_type: str = "regular", delay_penalty: float = 0.0,
    reduction: str | None = "mean", use_hat_loss: bool = False,
) -> Tensor:
    """RNN-T loss restricted to the pruned windows.

    Args:
      logits: (B, T, R, C) joiner output on the pruned lattice; symbols: int64 (B, S);
      ranges: int64 (B, T, R) from :func:`get_rnnt_prune_ranges`.
    Returns:
      (B,) for reduction "none", else a scalar.
    """
    px, py = get_rnnt_logprobs_pruned(logits, symbols, ranges, termination_symbol, boundary,
                                      rnnt_type, use_hat_loss)
    return _run(px, py, boundary, rnnt_type, delay_penalty, reduction, False)
