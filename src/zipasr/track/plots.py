"""Figures of a run for Snakemake's HTML report (``make report``): the learning curves from
``{exp_dir}/metrics.jsonl`` and the WER table ``{exp_dir}/wer.tsv`` as grouped bars and as an
HTML table. Subcommand ``zipasr plot`` (the workflow's ``plots`` rule).

``metrics.jsonl`` is what the trainer writes (``zipasr.train.trainer``), one JSON object a line:
every ``train.log_interval`` batches ``{"batch", "epoch", "lr", "loss", "audio_per_second"[,
"simple_loss", "pruned_loss", "ctc_loss", "grad_scale"]}`` (losses per frame, of that batch),
and after each validation ``{"batch", "epoch", "valid_loss"}``: every ``train.valid_interval``
batches and at the end of each epoch, the epoch's last validation.

This module is light (argparse only): the workflow imports :data:`FIGURE_FILES` from it, and
matplotlib is imported by the subcommand only, with the Agg backend (no display). Every file is
written under a temporary name and renamed when complete (``zipasr.io``).
"""

from __future__ import annotations

import argparse
import html
import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from zipasr.errors import ZipasrError
from zipasr.io import atomic_path, write_text_atomic

log = logging.getLogger("zipasr.track")

# The files `zipasr plot --out-dir D` writes into D (the plots rule declares the same names).
FIGURE_FILES = {
    "curves": "learning-curves.png",
    "curves_svg": "learning-curves.svg",
    "wer": "wer.png",
    "wer_svg": "wer.svg",
    "wer_table": "wer.html",
}
# Figure sizes in inches at DPI dots per inch: the PNGs are exactly these many pixels.
DPI = 100
CURVES_SIZE = (9.0, 6.0)
WER_SIZE = (8.0, 4.5)

# the averaged model's name at the end of a WER table column (zipasr.decode.names.model_name)
_MODEL = re.compile(r"-(epoch-\d+_(?:avg-\d+|last-\d+-batches)(?:_use-averaged-model)?)$")


# -- reading ---------------------------------------------------------------------------------

@dataclass
class Curves:
    """metrics.jsonl as series, each sorted by batch."""

    train: list[dict[str, Any]] = field(default_factory=list)  # the training-batch records
    valid: list[tuple[int, int, float]] = field(default_factory=list)  # (batch, epoch, loss)

    def epoch_ends(self) -> list[tuple[int, int, float]]:
        """(batch, epoch, valid loss) of the validation at each epoch's end: the epoch's last."""
        last: dict[int, tuple[int, int, float]] = {}
        for rec in self.valid:
            last[rec[1]] = rec
        return [last[e] for e in sorted(last)]


def read_metrics(path: Path) -> Curves:
    path = Path(path)
    if not path.is_file():
        raise ZipasrError(f"{path} does not exist (the trainer writes it next to its "
                          "checkpoints)")
    curves = Curves()
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            batch, epoch = int(rec["batch"]), int(rec["epoch"])
        except (ValueError, KeyError, TypeError) as e:
            raise ZipasrError(f"{path}:{n}: not a metrics record ({e})") from None
        if "valid_loss" in rec:
            curves.valid.append((batch, epoch, float(rec["valid_loss"])))
        elif "loss" in rec:
            curves.train.append(rec)
    curves.train.sort(key=lambda r: r["batch"])  # stable: same-batch records keep their order
    curves.valid.sort(key=lambda r: r[0])
    if not curves.train and not curves.valid:
        raise ZipasrError(f"{path} holds no training or validation record")
    return curves


@dataclass
class WerTable:
    test_sets: list[str]
    settings: list[str]  # the table's columns, {key}-{model}
    wer: list[list[float]]  # [test set][setting], NaN for a missing cell ("-")

    def model(self) -> str | None:
        """The averaged model every column shares, if they share one."""
        models = {m.group(1) if (m := _MODEL.search(s)) else None for s in self.settings}
        return models.pop() if len(models) == 1 else None

    def labels(self) -> list[str]:
        """Readable column names: without the shared model, methods spelled out."""
        shared = self.model()
        return [setting_label(_MODEL.sub("", s) if shared else s) for s in self.settings]


def read_wer_table(path: Path) -> WerTable:
    """``zipasr wer-table``'s TSV: ``test_set`` then a column per setting; ``-``: no cell."""
    path = Path(path)
    if not path.is_file():
        raise ZipasrError(f"{path} does not exist")
    rows = [ln.split("\t") for ln in path.read_text().splitlines() if ln.strip()]
    if not rows or rows[0][0] != "test_set" or len(rows[0]) < 2:
        raise ZipasrError(f"{path} is not a WER table (header test_set<TAB>setting...)")
    settings = rows[0][1:]
    wer = []
    for n, row in enumerate(rows[1:], 2):
        if len(row) != len(rows[0]):
            raise ZipasrError(f"{path}:{n}: {len(row)} cells, the header has {len(rows[0])}")
        try:
            wer.append([math.nan if c.strip() == "-" else float(c) for c in row[1:]])
        except ValueError as e:
            raise ZipasrError(f"{path}:{n}: {e}") from None
    return WerTable([r[0] for r in rows[1:]], settings, wer)


def setting_label(key: str) -> str:
    """``modified beam search, beam 4, chunk 16, left context 128`` from
    ``modified_beam_search_beam-size-4-chunk-16-left-context-128`` (other names unchanged)."""
    m = re.fullmatch(r"(greedy_search|modified_beam_search)(?:_beam-size-(\d+))?"
                     r"(?:-chunk-(\d+)-left-context-(\d+))?(-simulated)?(-.+)?", key)
    if m is None:
        return key
    method, beam, chunk, left, simulated, rest = m.groups()
    parts = [method.replace("_", " ")]
    if beam:
        parts.append(f"beam {beam}")
    if chunk:
        parts.append(f"chunk {chunk}, left context {left}")
    if simulated:
        parts.append("simulated")
    return ", ".join(parts) + (f" ({rest[1:]})" if rest else "")


# -- drawing ---------------------------------------------------------------------------------

def _figure(size: tuple[float, float]):
    """A pyplot-free figure on the Agg canvas: no display, no global figure state."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path) -> None:
    fmt = path.suffix.lstrip(".")
    # no creation date in the files: the same inputs give the same bytes
    meta = {"Date": None} if fmt == "svg" else {}
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=fmt, dpi=DPI, metadata=meta)
    log.info("wrote %s", path)


def plot_learning_curves(curves: Curves, outputs: list[Path], run: str = "") -> None:
    """Two panels over the training batch: the training loss per logged batch with the
    validation loss (a filled, labelled marker at each epoch's end; hollow between), and the
    learning rate."""
    from matplotlib.ticker import FuncFormatter

    fig = _figure(CURVES_SIZE)
    ax, ax_lr = fig.subplots(2, 1, sharex=True, height_ratios=[2.2, 1])
    ends = curves.epoch_ends()
    for batch, _, _ in ends:  # epoch boundaries
        for a in (ax, ax_lr):
            a.axvline(batch, color="0.8", linestyle=":", linewidth=1, zorder=0)

    if curves.train:
        xs = [r["batch"] for r in curves.train]
        ax.plot(xs, [r["loss"] for r in curves.train], color="tab:blue", linewidth=1.2,
                label="training loss (logged batch)")
    if curves.valid:
        ends_at = {(b, e) for b, e, _ in ends}
        ax.plot([v[0] for v in curves.valid], [v[2] for v in curves.valid], color="tab:orange",
                linestyle="--", linewidth=1, label="validation loss")
        within = [v for v in curves.valid if (v[0], v[1]) not in ends_at]
        if within:  # train.valid_interval's validations
            ax.plot([v[0] for v in within], [v[2] for v in within], linestyle="none",
                    marker="o", markersize=5, color="tab:orange", markerfacecolor="white",
                    label="validation loss, within an epoch")
        ax.plot([v[0] for v in ends], [v[2] for v in ends], linestyle="none", marker="o",
                markersize=8, color="tab:orange", label="validation loss, end of epoch")
        for batch, epoch, loss in ends:
            ax.annotate(f"epoch {epoch}: {loss:.3f}", (batch, loss), textcoords="offset points",
                        xytext=(-6, 12), ha="right", va="bottom", fontsize=9,
                        color="tab:orange", fontweight="bold",
                        bbox={"boxstyle": "round,pad=0.2", "fc": "white", "ec": "none",
                              "alpha": 0.85})
    losses = [r["loss"] for r in curves.train] + [v[2] for v in curves.valid]
    if losses and min(losses) > 0 and max(losses) / min(losses) > 20:
        ax.set_yscale("log")  # the first batches' loss dwarfs the rest
        ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}"))
        ax.yaxis.set_minor_formatter(FuncFormatter(
            lambda y, _: f"{y:g}" if round(y / 10 ** math.floor(math.log10(y))) in (2, 3, 5)
            else ""))
        ax.set_ylabel("loss per frame (nats, log scale)")
    else:
        ax.set_ylabel("loss per frame (nats)")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(loc="upper right", fontsize=9)
    ax.set_title(f"{run}: learning curves" if run else "Learning curves")

    lrs = [(r["batch"], r["lr"]) for r in curves.train if "lr" in r]
    if lrs:
        ax_lr.plot([b for b, _ in lrs], [lr for _, lr in lrs], color="tab:green", linewidth=1.2)
        ax_lr.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}"))
    else:
        ax_lr.text(0.5, 0.5, "no training batch logged", transform=ax_lr.transAxes,
                   ha="center", va="center", color="0.4")
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("training batch (optimizer steps)")
    ax_lr.set_ylim(bottom=0)
    ax_lr.grid(True, alpha=0.3)
    ax.set_xlim(left=0)
    for path in outputs:
        _save(fig, path)


def plot_wer(table: WerTable, outputs: list[Path], run: str = "") -> None:
    """Grouped bars: a group per test set, a bar per decoding setting, its WER written on it."""
    import numpy as np

    fig = _figure(WER_SIZE)
    ax = fig.subplots()
    n = len(table.settings)
    width = 0.8 / n
    x = np.arange(len(table.test_sets))
    wer = np.array(table.wer, dtype=float).reshape(len(table.test_sets), n)
    for j, label in enumerate(table.labels()):
        bars = ax.bar(x + (j - (n - 1) / 2) * width, np.nan_to_num(wer[:, j]), width,
                      label=label, color=f"C{j}")
        ax.bar_label(bars, labels=["-" if math.isnan(w) else f"{w:.2f}" for w in wer[:, j]],
                     padding=2, fontsize=9)
    ax.set_xticks(x, table.test_sets)
    ax.set_xlabel("test set")
    ax.set_ylabel("WER (%)")
    top = np.nanmax(wer) if np.isfinite(wer).any() else 1.0
    ax.set_ylim(0, top * 1.15 or 1.0)  # room for the labels above the bars
    ax.grid(True, axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    model = table.model()
    ax.set_title((f"{run}: word error rate" if run else "Word error rate")
                 + (f", model {model}" if model else ""))
    fig.legend(loc="outside lower center", ncols=min(n, 2), fontsize=9, frameon=False)
    for path in outputs:
        _save(fig, path)


def wer_table_html(table: WerTable, run: str = "") -> str:
    """A standalone HTML page: the WER table, the best WER of each test set in bold."""
    esc = html.escape
    model = table.model()
    head = "".join(f'<th title="{esc(s)}">{esc(lab)}</th>'
                   for s, lab in zip(table.settings, table.labels(), strict=True))
    rows = []
    for t, wers in zip(table.test_sets, table.wer, strict=True):
        best = min((w for w in wers if not math.isnan(w)), default=math.nan)
        cells = "".join("<td>-</td>" if math.isnan(w) else
                        f"<td><b>{w:.2f}</b></td>" if w == best else f"<td>{w:.2f}</td>"
                        for w in wers)
        rows.append(f"<tr><th>{esc(t)}</th>{cells}</tr>")
    caption = (f"{run}: " if run else "") + "WER (%) per test set and decoding setting" + (
        f", model {model}" if model else "")
    return (
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>WER</title><style>"
        "body{font-family:sans-serif;margin:1em}"
        "table{border-collapse:collapse}caption{text-align:left;margin-bottom:.5em}"
        "th,td{border:1px solid #ccc;padding:.3em .8em}td{text-align:right}"
        "thead th{background:#f0f0f0}"
        "</style></head><body>\n"
        f"<table>\n<caption>{esc(caption)}</caption>\n"
        f"<thead><tr><th>test set</th>{head}</tr></thead>\n<tbody>\n"
        + "\n".join(rows) + "\n</tbody></table>\n</body></html>\n")


def write_figures(metrics: Path, wer_table: Path, out_dir: Path, run: str = "") -> list[Path]:
    """Every file of :data:`FIGURE_FILES` in ``out_dir``; returns their paths. ``run`` names
    the run in the titles."""
    import matplotlib

    matplotlib.use("Agg")
    matplotlib.rcParams["svg.fonttype"] = "none"  # text stays text: small, searchable SVGs
    matplotlib.rcParams["svg.hashsalt"] = "zipasr"  # stable ids: same inputs, same bytes
    curves = read_metrics(metrics)
    table = read_wer_table(wer_table)
    out = {k: Path(out_dir) / name for k, name in FIGURE_FILES.items()}
    plot_learning_curves(curves, [out["curves"], out["curves_svg"]], run)
    plot_wer(table, [out["wer"], out["wer_svg"]], run)
    write_text_atomic(out["wer_table"], wer_table_html(table, run))
    log.info("wrote %s", out["wer_table"])
    return list(out.values())


# -- CLI -------------------------------------------------------------------------------------

def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plot", help="figures of a run for the report: learning curves "
                                    "(metrics.jsonl) and WERs (wer.tsv)")
    p.add_argument("--metrics", type=Path, required=True,
                   help="the trainer's {exp_dir}/metrics.jsonl")
    p.add_argument("--wer-table", type=Path, required=True, help="{exp_dir}/wer.tsv")
    p.add_argument("--out-dir", type=Path, required=True,
                   help="writes " + ", ".join(FIGURE_FILES.values()))
    p.add_argument("--title", default="", help="the run's name in the titles (e.g. its exp dir)")
    p.set_defaults(func=_plot)


def _plot(args: argparse.Namespace) -> int:
    write_figures(args.metrics, args.wer_table, args.out_dir, args.title)
    return 0
