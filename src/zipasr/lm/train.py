"""Training the LMs: the RNN-LM (epochs, resumable, tracked) and the bigram (one pass).

:func:`train_lm` trains :class:`~zipasr.lm.model.RnnLm` with icefall's rnn_lm recipe (Adam,
lr 1e-3, weight decay 1e-6, the summed sentence loss, gradient norm clipped to 5), on batches of
length-sorted sentences shuffled per epoch from a seeded generator. After every epoch it writes
``epoch-N.pt`` (model, optimizer, epoch, RNG, lm_config, fingerprint, per-epoch metrics) under a
temporary name; a rerun resumes from the newest one, so a killed job loses at most one epoch and
the resumed result equals an uninterrupted run bit for bit (on CPU, same thread count). At the end
it writes ``lm.pt`` (``{"model", "lm_config", "summary"}``) and ``lm-summary.json``.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from zipasr.errors import ZipasrError
from zipasr.io import atomic_path, write_text_atomic
from zipasr.lm.bigram import Arpa, BigramLm, estimate_kn, write_arpa
from zipasr.lm.data import collate, make_batches
from zipasr.lm.model import BLANK_ID, SOS_EOS_ID, RnnLm, RnnLmConfig
from zipasr.track.tracker import RunInfo, Tracker
from zipasr.train import checkpoint as ckpt
from zipasr.train.config import fingerprint

log = logging.getLogger(__name__)

LM_FILE, SUMMARY_FILE, METRICS_FILE = "lm.pt", "lm-summary.json", "metrics.jsonl"


@dataclass
class LmTrainConfig:
    num_epochs: int = 4
    lr: float = 1e-3             # icefall rnn_lm
    weight_decay: float = 1e-6   # icefall rnn_lm
    grad_clip: float = 5.0       # max L2 norm of the gradient, icefall rnn_lm
    max_tokens: int = 500        # padded positions per batch (rows x (longest + 1))
    max_sentences: int = 400     # sentences per batch (icefall's --batch-size)
    seed: int = 42

    def __post_init__(self) -> None:
        if self.num_epochs < 1:
            raise ZipasrError(f"num_epochs must be at least 1, not {self.num_epochs}")
        if not self.lr > 0 or self.weight_decay < 0 or not self.grad_clip > 0:
            raise ZipasrError(f"lr ({self.lr}) and grad_clip ({self.grad_clip}) must be positive, "
                              f"weight_decay ({self.weight_decay}) not negative")

    def identity(self) -> dict[str, Any]:
        """What the trained weights depend on (num_epochs may grow between runs)."""
        return {k: v for k, v in asdict(self).items() if k != "num_epochs"}


class LmTracker(Tracker):
    """The MLflow tracker of ``zipasr train-lm``: the training run's tracker, with one metrics
    record per epoch (the step is the epoch) and the LM files as artifacts."""

    def start(self, run: RunInfo, resumed: bool) -> None:
        super().start(run, resumed)
        self.interval = 1  # an epoch record is never thinned out

    def log_epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        self.log_train({"batch": epoch, **metrics})

    def log_artifacts(self, paths: Sequence[Path], artifact_path: str = "lm") -> None:
        if not self.active:
            return
        for p in paths:
            if Path(p).is_file():
                self.guard(self.client.log_artifact, self.run_id, str(p), artifact_path)


def _digest(sentences: Sequence[Sequence[int]]) -> str:
    return fingerprint([list(s) for s in sentences])


def evaluate(model: RnnLm, sentences: Sequence[Sequence[int]], *, max_tokens: int = 4000,
             max_sentences: int = 400) -> tuple[float, int]:
    """(total nll in nats, number of predicted tokens incl. ``<sos/eos>``) of ``sentences``."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for idx in make_batches([len(s) for s in sentences], max_tokens=max_tokens,
                                max_sentences=max_sentences):
            x, y, lengths = collate([sentences[i] for i in idx])
            total += float(model(x, y, lengths).sum())
            count += int(lengths.sum())
    model.train(was_training)
    return total, count


def _check_sentences(sentences: Sequence[Sequence[int]], vocab_size: int, what: str) -> None:
    if not sentences:
        raise ZipasrError(f"no {what} sentences")
    for k, s in enumerate(sentences):
        if not len(s):
            raise ZipasrError(f"{what} sentence {k} is empty")
        if min(s) < 0 or max(s) >= vocab_size or BLANK_ID in s or SOS_EOS_ID in s:
            raise ZipasrError(f"{what} sentence {k} holds ids outside the tokens "
                              f"2..{vocab_size - 1}")


def _resume(out_dir: Path, num_epochs: int, fp: str) -> dict[str, Any] | None:
    """The newest usable ``epoch-N.pt`` (N <= num_epochs) of this configuration, or None.

    Checkpoints of another configuration or text are moved to ``superseded-<time>/`` (never
    deleted, never resumed from) and training starts afresh, as ``zipasr train`` does: the
    DAG reruns the LM in the same directory after an ``lm.*`` change."""
    for epoch, path in reversed(ckpt.list_checkpoints(out_dir, "epoch")):
        if epoch > num_epochs:
            continue
        try:
            c = ckpt.load_checkpoint(path, required=("model", "optimizer", "epoch"))
        except ckpt.CheckpointError as e:
            log.warning("%s unusable (%s): trying an older checkpoint", path, e.reason)
            continue
        if "lm_config" not in c:
            raise ZipasrError(f"{path} is not an LM checkpoint (an ASR experiment directory?): "
                              "give the LM a directory of its own")
        if c.get("fingerprint") != fp:
            dest = out_dir / f"superseded-{time.strftime('%Y%m%d-%H%M%S')}"
            dest.mkdir(exist_ok=True)
            for old in out_dir.glob("epoch-*.pt"):
                shutil.move(str(old), dest / old.name)
            log.warning("%s is of another LM configuration or training text (fingerprint %s, "
                        "this run's %s): moved the checkpoints to %s and started afresh",
                        path, c.get("fingerprint"), fp, dest)
            return None
        return c
    return None


def train_lm(train: Sequence[Sequence[int]], valid: Sequence[Sequence[int]], out_dir: Path,
             lm_config: RnnLmConfig, cfg: LmTrainConfig | None = None, *,
             tracker: LmTracker | None = None, bpe_model: Path | None = None,
             input_md5: dict[Path, str] | None = None,
             extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train (or resume) the RNN-LM to ``cfg.num_epochs`` in ``out_dir``, write ``lm.pt`` and
    ``lm-summary.json``; the summary.

    Args:
      train, valid: token-id sentences (no ``<sos/eos>``); valid only measures perplexity.
      tracker: MLflow hooks (start, one record per epoch); finishing the run is the caller's.
      bpe_model, input_md5: for the tracker (the BPE files as artifacts, data hashes as tags).
      extra: more summary entries (the CLI's bigram figures).
    """
    cfg = cfg or LmTrainConfig()
    out_dir = Path(out_dir)
    _check_sentences(train, lm_config.vocab_size, "training")
    _check_sentences(valid, lm_config.vocab_size, "validation")
    fp = fingerprint({"lm_config": lm_config.to_dict(), "train": cfg.identity(),
                      "train_text": _digest(train), "valid_text": _digest(valid)})
    t_run = time.perf_counter()
    torch.manual_seed(cfg.seed)
    model = RnnLm(lm_config)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    out_dir.mkdir(parents=True, exist_ok=True)
    last = _resume(out_dir, cfg.num_epochs, fp)
    epochs: list[dict[str, Any]] = []
    train_seconds = 0.0
    if last is not None:
        model.load_state_dict(last["model"])
        optimizer.load_state_dict(last["optimizer"])
        ckpt.set_rng_state(last["rng"])
        epochs, train_seconds = list(last["metrics"]), float(last["train_seconds"])
        log.info("resuming the RNN-LM after epoch %d of %d", last["epoch"], cfg.num_epochs)
    start_epoch = last["epoch"] + 1 if last is not None else 1
    num_tokens = sum(len(s) for s in train)
    log.info("RNN-LM %s: %s params; %d training sentences (%d tokens), %d validation",
             lm_config.to_dict(), f"{model.num_params():,}", len(train), num_tokens, len(valid))
    if tracker is not None:
        tracker.start(RunInfo(
            exp_dir=out_dir, fingerprint=fp, batch_idx_train=start_epoch - 1, log_interval=1,
            train_config=asdict(cfg), model_config=lm_config.to_dict(),
            num_params=model.num_params(), device=torch.device("cpu"),
            input_md5=input_md5 or {}, numerics={"threads": torch.get_num_threads()},
            bpe_model=Path(bpe_model) if bpe_model else out_dir / "no-bpe-model"),
            resumed=last is not None)

    lengths = [len(s) for s in train]
    model.train()
    for epoch in range(start_epoch, cfg.num_epochs + 1):
        t0 = time.perf_counter()
        # the epoch's order from its own generator: a resumed epoch sees the same batches
        gen = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
        total, count = 0.0, 0
        for idx in make_batches(lengths, max_tokens=cfg.max_tokens,
                                max_sentences=cfg.max_sentences, generator=gen):
            x, y, lens = collate([train[i] for i in idx])
            loss = model(x, y, lens).sum()
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip, norm_type=2.0)
            optimizer.step()
            total += float(loss.detach())
            count += int(lens.sum())
        v_total, v_count = evaluate(model, valid)  # larger batches: no gradients kept
        seconds = time.perf_counter() - t0
        train_seconds += seconds
        rec = {"epoch": epoch, "train_loss": total / count, "train_ppl": math.exp(total / count),
               "valid_loss": v_total / v_count, "valid_ppl": math.exp(v_total / v_count),
               "seconds": round(seconds, 2)}
        epochs.append(rec)
        log.info("RNN-LM epoch %d/%d: train ppl %.3f, valid ppl %.3f (%.1f s)", epoch,
                 cfg.num_epochs, rec["train_ppl"], rec["valid_ppl"], seconds)
        _save(out_dir / f"epoch-{epoch}.pt", {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch,
            "rng": ckpt.rng_state(), "lm_config": lm_config.to_dict(),
            "train_config": asdict(cfg), "fingerprint": fp, "metrics": epochs,
            "train_seconds": train_seconds})
        write_text_atomic(out_dir / METRICS_FILE, "".join(json.dumps(r) + "\n" for r in epochs))
        if tracker is not None:
            tracker.log_epoch(epoch, {k: v for k, v in rec.items() if k != "epoch"})

    final = epochs[-1]
    summary = {
        "epochs": cfg.num_epochs, "train_ppl": final["train_ppl"],
        "valid_ppl": final["valid_ppl"], "valid_loss": final["valid_loss"],
        "per_epoch": epochs, "train_seconds": round(train_seconds, 1),
        "seconds_this_run": round(time.perf_counter() - t_run, 1),
        "resumed_after_epoch": start_epoch - 1,
        "num_train_sentences": len(train), "num_train_tokens": num_tokens,
        "num_valid_sentences": len(valid), "num_valid_tokens": sum(len(s) for s in valid),
        "num_params": model.num_params(), "lm_config": lm_config.to_dict(),
        "train_config": asdict(cfg), "fingerprint": fp, "threads": torch.get_num_threads(),
        **(extra or {}),
    }
    _save(out_dir / LM_FILE, {"model": model.state_dict(), "lm_config": lm_config.to_dict(),
                               "summary": summary})
    write_summary(out_dir, summary)
    return summary


def _save(path: Path, checkpoint: dict[str, Any]) -> None:
    with atomic_path(path) as tmp:
        torch.save(checkpoint, tmp)


def write_summary(out_dir: Path, summary: dict[str, Any]) -> Path:
    path = Path(out_dir) / SUMMARY_FILE
    write_text_atomic(path, json.dumps(summary, indent=2) + "\n")
    return path


# -- the bigram ------------------------------------------------------------------------------

def _pieces(sp: Any) -> list[str]:
    return [sp.id_to_piece(i) for i in range(sp.get_piece_size())]


def train_bigram(sentences: Sequence[Sequence[int]], sp: Any, out_path: Path) -> Arpa:
    """Kneser-Ney bigram (:func:`zipasr.lm.bigram.estimate_kn`) of token-id sentences over the
    pieces of ``sp``, written to ``out_path`` as ARPA."""
    arpa = estimate_kn(sentences, _pieces(sp), skip_ids=(BLANK_ID, SOS_EOS_ID))
    write_arpa(arpa, out_path)
    log.info("bigram: %d unigrams, %d bigrams -> %s", len(arpa.unigrams), len(arpa.bigrams),
             out_path)
    return arpa


def bigram_perplexity(arpa: Arpa, sp: Any, sentences: Sequence[Sequence[int]]) -> float:
    """Per-token perplexity (``</s>`` counted, as the RNN-LM's ``<sos/eos>``) of ``sentences``."""
    pieces = _pieces(sp)
    lm = BigramLm.from_arpa(arpa, {p: i for i, p in enumerate(pieces)}, dtype=torch.float64)
    total = float(lm.sentence_log_probs(sentences).sum())
    return math.exp(-total / sum(len(s) + 1 for s in sentences))
