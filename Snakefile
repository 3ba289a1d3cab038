# zipasr: the whole pipeline as one Snakemake DAG. Every rule is a thin call of the `zipasr` CLI;
# the logic lives in src/zipasr. See README.md.
import os
import sys
from pathlib import Path

from snakemake.exceptions import WorkflowError
from snakemake.utils import min_version, validate

from zipasr.config import validate_config
from zipasr.errors import ZipasrError

min_version("9.0")

# Rules call the `zipasr` of the environment Snakemake runs in, activated or not.
os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"


configfile: Path(workflow.basedir) / "config" / "config.yaml"


# First our own check, whose message names the mistyped key and suggests the right one; then
# Snakemake's validation against the same schema (kept for `snakemake --lint` and reports).
SCHEMA = Path(workflow.basedir) / "workflow" / "schemas" / "config.schema.yaml"
try:
    validate_config(config, SCHEMA)
except ZipasrError as e:
    raise WorkflowError(str(e)) from None
validate(config, SCHEMA)


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/lang.smk"
include: "workflow/rules/lm.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/decode.smk"
include: "workflow/rules/export.smk"
include: "workflow/rules/track.smk"
include: "workflow/rules/report.smk"


rule all:
    input:
        all_cuts(),
        lang_files(),
        f"{EXP}/wer.tsv",
        [f"{EXP}/onnx"] if EXPORT["onnx"] else [],
        rules.plots.output,
    default_target: True


rule data:
    """The data half of the DAG only: features of every part and the BPE model."""
    input:
        all_cuts(),
        lang_files(),
