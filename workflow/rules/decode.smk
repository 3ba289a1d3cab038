# Decoding (per evaluation part x method, and for a causal model x streaming setting) and the
# final WER table.
import re

BEAM = config["decode"]["beam"]
# (chunk, left context) pairs of a causal model's chunk-wise streaming decoding
PAIRS = [(s["chunk_size"], s["left_context_frames"]) for s in config["decode"].get("streaming", [])]
# every result key of the configuration per method, in the WER table's column order
KEYS = {m: [result_key(m, BEAM)] + [result_key(m, BEAM, c, left) for c, left in PAIRS]
        for m in config["decode"]["methods"]}
# streaming result key -> (chunk, left context)
STREAMING = {result_key(m, BEAM, c, left): (c, left) for m in KEYS for c, left in PAIRS}
# checked now, not after training: a non-causal model or a chunk it cannot decode with
check_chunks(PAIRS, "decode.streaming")


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
    if wildcards.key in STREAMING:
        chunk, left = STREAMING[wildcards.key]
        args += (f" --streaming --chunk-size {chunk} --left-context-frames {left}"
                 f" --num-streams {d.get('num_streams', 50)}")
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
        key="|".join(re.escape(result_key(m, BEAM))
                     for m in ("greedy_search", "modified_beam_search"))
        + "".join(f"|{re.escape(k)}" for k in STREAMING),
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
        [wer_summary(p, m, k) for p in EVAL_PARTS for m, keys in KEYS.items() for k in keys],
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
