"""`make report`'s figures: `zipasr plot` draws the learning curves of a metrics.jsonl in the
trainer's format and the WER table as bars and HTML; the workflow's plots rule makes them (it is
in `all`) and Snakemake's `--report` embeds them with their captions.

The inputs are written here (training and decoding are not run): the plots rule is run alone
with `--allowed-rules plots`, for which the train summary and the WER table are source files,
as after a real run."""

from __future__ import annotations

import base64
import json
import math
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import yaml
from helpers import BIN, ROOT, planned_jobs, snakemake, tool_env
from PIL import Image

from zipasr.track.plots import CURVES_SIZE, DPI, FIGURE_FILES, WER_SIZE, setting_label

MODEL = "epoch-2_avg-1_use-averaged-model"
COLUMNS = [f"greedy_search-{MODEL}", f"modified_beam_search_beam-size-4-{MODEL}",
           f"greedy_search-chunk-16-left-context-128-{MODEL}"]
# dev has no chunk-wise cell: `zipasr wer-table` writes "-"
WER_TSV = ("test_set\t" + "\t".join(COLUMNS) + "\n"
           "dev\t7.32\t6.76\t-\n"
           "test\t9.23\t7.90\t11.05\n")
# matplotlib's default colours: tab:blue, tab:orange, tab:green
BLUE, ORANGE, GREEN = (31, 119, 180), (255, 127, 14), (44, 160, 44)


def write_metrics(path: Path, epochs: int = 2, batches: int = 60, log_interval: int = 5,
                  valid_interval: int = 25) -> None:
    """metrics.jsonl as zipasr.train.trainer writes it (Trainer.run / _log_metrics): a record
    every log_interval batches with the batch's per-frame losses and the learning rate, one
    every valid_interval batches with the validation loss, and one at each epoch's end (after
    the last in-epoch validation, at the same batch count)."""
    lines, batch = [], 0
    for epoch in range(1, epochs + 1):
        for _ in range(batches):
            batch += 1
            if batch % log_interval == 0:
                simple, pruned, ctc = 6.0 / math.sqrt(batch), 5.0 / batch ** 0.6, 4.0 / batch ** 0.5
                lr = 0.045 * min(1.0, batch / 20) * (1 + batch / 200) ** -0.5 * (
                    1 + (epoch - 1) / 3.5) ** -0.5
                lines.append({"batch": batch, "epoch": epoch, "lr": lr,
                              "loss": 0.5 * simple + pruned + 0.2 * ctc,
                              "audio_per_second": 12.0 + batch % 3,
                              "simple_loss": simple, "pruned_loss": pruned, "ctc_loss": ctc})
            if batch % valid_interval == 0:
                lines.append({"batch": batch, "epoch": epoch, "valid_loss": 3.0 / batch ** 0.5})
        lines.append({"batch": batch, "epoch": epoch, "valid_loss": 2.9 / batch ** 0.5})
    path.write_text("".join(json.dumps(rec) + "\n" for rec in lines))


def assert_figure(path: Path, size: tuple[float, float], colours: list[tuple[int, int, int]]):
    """A PNG of size x DPI pixels, not blank, with each colour's curve or bar drawn."""
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path
    with Image.open(path) as im:
        assert im.format == "PNG"
        assert im.size == (round(size[0] * DPI), round(size[1] * DPI)), (path, im.size)
        rgb = np.asarray(im.convert("RGB")).astype(int)
    assert rgb.mean(axis=2).var() > 100, f"{path} is (nearly) blank"
    for c in colours:
        near = (np.abs(rgb - np.array(c)).sum(axis=2) < 30).sum()
        assert near > 200, f"{path}: {near} pixels of colour {c}"


def run_plot(metrics: Path, wer: Path, out: Path) -> None:
    proc = subprocess.run([str(BIN / "zipasr"), "plot", "--metrics", str(metrics),
                           "--wer-table", str(wer), "--out-dir", str(out), "--title", "exp/t"],
                          capture_output=True, text=True, env=tool_env())
    assert proc.returncode == 0, proc.stderr


def test_plot_cli_writes_readable_figures(tmp_path: Path) -> None:
    metrics, wer, out = tmp_path / "metrics.jsonl", tmp_path / "wer.tsv", tmp_path / "figures"
    write_metrics(metrics)
    wer.write_text(WER_TSV)
    run_plot(metrics, wer, out)

    assert sorted(p.name for p in out.iterdir()) == sorted(FIGURE_FILES.values())  # no temps
    # loss (blue), validation loss (orange), learning rate (green); three settings' bars
    assert_figure(out / FIGURE_FILES["curves"], CURVES_SIZE, [BLUE, ORANGE, GREEN])
    assert_figure(out / FIGURE_FILES["wer"], WER_SIZE, [BLUE, ORANGE, GREEN])

    # the SVGs keep their text: axis labels with units, epoch labels, bar values
    curves = ET.parse(out / FIGURE_FILES["curves_svg"]).getroot().itertext()
    text = " ".join(curves)
    for s in ("loss per frame (nats", "learning rate", "training batch", "epoch 1: ",
              "epoch 2: ", "validation loss, end of epoch"):
        assert s in text, s
    text = " ".join(ET.parse(out / FIGURE_FILES["wer_svg"]).getroot().itertext())
    for s in ("WER (%)", "7.32", "6.76", "9.23", "7.90", "11.05", "greedy search",
              "modified beam search, beam 4", MODEL):
        assert s in text, s

    table = (out / FIGURE_FILES["wer_table"]).read_text()
    assert "<b>6.76</b>" in table and "<b>7.90</b>" in table and "<td>-</td>" in table
    assert "<tr><th>dev</th>" in table and "<tr><th>test</th>" in table

    # the same inputs give the same files (no dates in them)
    again = tmp_path / "again"
    run_plot(metrics, wer, again)
    for name in (FIGURE_FILES["curves"], FIGURE_FILES["curves_svg"], FIGURE_FILES["wer_table"]):
        assert (out / name).read_bytes() == (again / name).read_bytes(), name


@pytest.mark.parametrize("key, label", [
    ("greedy_search", "greedy search"),
    ("modified_beam_search_beam-size-8", "modified beam search, beam 8"),
    ("greedy_search-chunk-32-left-context-64", "greedy search, chunk 32, left context 64"),
    ("greedy_search-epoch-1_avg-1", "greedy search (epoch-1_avg-1)"),
    ("something-else", "something-else"),
])
def test_setting_labels(key: str, label: str) -> None:
    assert setting_label(key) == label


def test_bad_inputs_are_named(tmp_path: Path) -> None:
    wer = tmp_path / "wer.tsv"
    wer.write_text(WER_TSV)
    proc = subprocess.run([str(BIN / "zipasr"), "plot", "--metrics", str(tmp_path / "none"),
                           "--wer-table", str(wer), "--out-dir", str(tmp_path / "f")],
                          capture_output=True, text=True, env=tool_env())
    assert proc.returncode == 2 and "none does not exist" in proc.stderr
    assert not (tmp_path / "f").exists()


def test_report_embeds_the_figures(workdir: Path) -> None:
    cfg = yaml.safe_load((ROOT / "config" / "smoke.yaml").read_text())
    # `all` asks for the figures: a fresh run plans the plots rule
    assert planned_jobs(workdir, cfg)["plots"] == 1

    exp = workdir / cfg["exp_dir"]
    exp.mkdir(parents=True)
    write_metrics(exp / "metrics.jsonl")
    (exp / "wer.tsv").write_text(WER_TSV)
    (exp / "train-summary.json").write_text(json.dumps({"epochs": 2}) + "\n")
    snakemake(workdir, cfg, "plots", "--allowed-rules", "plots")
    figures = exp / "figures"
    assert_figure(figures / FIGURE_FILES["curves"], CURVES_SIZE, [BLUE, ORANGE, GREEN])
    assert list((workdir / "logs" / "plots").glob("*.benchmark.tsv"))
    assert "wrote" in next((workdir / "logs" / "plots").glob("*.log")).read_text()

    snakemake(workdir, cfg, "plots", "--allowed-rules", "plots", "--report", "report.html")
    report = (workdir / "report.html").read_text()
    for name in ("curves", "wer", "wer_table"):
        data = base64.b64encode((figures / FIGURE_FILES[name]).read_bytes()).decode()
        assert data in report, f"{name} is not embedded in the report"
    # captions and the front page, rendered with the run's config
    assert f"Learning curves of <tt class=\\\"docutils literal\\\">{cfg['exp_dir']}</tt>" \
        in report
    assert "Word error rate (%) of the averaged model" in report
    assert "Hover a column header" in report
    assert "zipasr: a Zipformer transducer" in report
