# Decoding (per evaluation part x method) and the final WER table.
import re


def wer_summary(part, method, key):
    """{EXP}/{method}/wer-summary-{part}-{key}-{AVG_NAME}.txt: the name `zipasr decode
    --result-dir {EXP}/{method} --suffix {AVG_NAME}` writes (zipasr.decode.names)."""
    return f"{EXP}/{method}/{result_file('wer-summary', part, key, AVG_NAME)}"


def decode_args(wildcards):
    """The decoding options one job reads: the beam matters to beam search only."""
    d = config["decode"]
    args = f"--max-duration {d['max_duration']}"
    if wildcards.method != "greedy_search":
        args += f" --beam {d['beam']}"
    return args


rule decode:
    input:
        model=f"{EXP}/{AVG_NAME}.pt",
        cuts=lambda w: cuts(w.part),
        bpe=f"{lang_dir()}/bpe.model",
    output:
        wer_summary("{part}", "{method}", "{key}"),
    params:
        args=decode_args,
    log:
        f"logs/decode/{EXP_NAME}-{{part}}-{{method}}-{{key}}.log",
    benchmark:
        f"logs/decode/{EXP_NAME}-{{part}}-{{method}}-{{key}}.benchmark.tsv"
    wildcard_constraints:
        method="greedy_search|modified_beam_search",
        # the keys `zipasr decode` writes for the configured beam: a file of another beam
        # has no rule (instead of a job that would write a different name)
        key="|".join(re.escape(result_key(m, config["decode"]["beam"]))
                     for m in ("greedy_search", "modified_beam_search")),
    threads: 1
    shell:
        "zipasr decode --model {input.model} --bpe-model {input.bpe} --cuts {input.cuts}"
        " --test-set {wildcards.part} --method {wildcards.method} {params.args}"
        " --num-threads {threads} --result-dir {EXP}/{wildcards.method} --suffix {AVG_NAME}"
        " 2> {log}"


rule score:
    # exactly the current configuration's results: files of another beam or averaged model
    # left in {EXP} are neither in the table nor in MLflow
    input:
        [wer_summary(p, m, result_key(m, config["decode"]["beam"]))
         for p in EVAL_PARTS for m in config["decode"]["methods"]],
    output:
        f"{EXP}/wer.tsv",
    log:
        f"logs/score/{EXP_NAME}.log",
    benchmark:
        f"logs/score/{EXP_NAME}.benchmark.tsv"
    shell:
        "zipasr wer-table {input} --out {output} 2> {log} && cat {output}"
        # MLflow (tracking.* config; a no-op when off, never fails the rule): WERs, files, model
        " && zipasr track-results --exp-dir {EXP} --summaries {input} --wer-table {output}"
        " --model {EXP}/{AVG_NAME}.pt"
        " --log-files logs/train/{EXP_NAME}.log 2>> {log}"
