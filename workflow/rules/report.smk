# Snakemake's HTML report (`make report`, i.e. `snakemake --report report.html`): the run's
# learning curves and WERs as figures and a table (zipasr.track.plots), with the captions and
# the front page in workflow/report/. The figures are in `all`: a few seconds after scoring.
from zipasr.track.plots import FIGURE_FILES

FIGURES = f"{EXP}/figures"


report: "../report/workflow.rst"


rule plots:
    input:
        # metrics.jsonl is written by training next to its checkpoints, before this summary
        # (not an output of the train rule: a resumed run appends to it)
        summary=f"{EXP}/train-summary.json",
        wer_table=f"{EXP}/wer.tsv",
    output:
        curves=report(f"{FIGURES}/{FIGURE_FILES['curves']}",
                      caption="../report/learning-curves.rst", category="Training",
                      labels={"figure": "learning curves"}),
        curves_svg=f"{FIGURES}/{FIGURE_FILES['curves_svg']}",
        wer=report(f"{FIGURES}/{FIGURE_FILES['wer']}", caption="../report/wer.rst",
                   category="Results", labels={"figure": "WER bars"}),
        wer_svg=f"{FIGURES}/{FIGURE_FILES['wer_svg']}",
        wer_table=report(f"{FIGURES}/{FIGURE_FILES['wer_table']}",
                         caption="../report/wer-table.rst", category="Results",
                         labels={"figure": "WER table"}),
    log:
        f"logs/plots/{EXP_NAME}.log",
    benchmark:
        f"logs/plots/{EXP_NAME}.benchmark.tsv"
    # seconds of matplotlib: on a cluster, run where Snakemake runs rather than queue a job
    localrule: True
    shell:
        "zipasr plot --metrics {EXP}/metrics.jsonl --wer-table {input.wer_table}"
        " --out-dir {FIGURES} --title {EXP:q} 2> {log}"
