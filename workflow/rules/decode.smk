# Decoding (per evaluation part x method, and for a causal model x streaming setting) and the
# final WER table.
import re

DECODE = config["decode"]
BEAM = DECODE["beam"]
# (chunk, left context) pairs of a causal model's chunk-wise streaming decoding
PAIRS = [(s["chunk_size"], s["left_context_frames"]) for s in DECODE.get("streaming", [])]


def lm_scales(method):
    """The LM methods' scales (icefall's shallow fusion / LODR weights), part of their result
    keys and options; none for the other methods."""
    if method not in LM_METHODS:
        return {}
    if method == "modified_beam_search_LODR":
        return {"lm_scale": DECODE["lm_scale"], "lodr_scale": DECODE["lodr_scale"]}
    return {"lm_scale": DECODE["lm_scale"]}


# every result key of the configuration per method, in the WER table's column order, and the
# streaming ones' (chunk, left context); the CTC searches decode whole utterances only
KEYS = {}
STREAMING = {}
for _m in DECODE["methods"]:
    KEYS[_m] = [result_key(_m, BEAM, **lm_scales(_m))]
    for _c, _left in [] if _m in CTC_METHODS else PAIRS:
        _key = result_key(_m, BEAM, _c, _left, **lm_scales(_m))
        KEYS[_m].append(_key)
        STREAMING[_key] = (_c, _left)
# checked now, not after training: a non-causal model or a chunk it cannot decode with
check_chunks(PAIRS, "decode.streaming")
if set(DECODE["methods"]) & set(CTC_METHODS) and not MODEL_CONFIG.use_ctc:
    raise WorkflowError(
        f"decode.methods {', '.join(m for m in DECODE['methods'] if m in CTC_METHODS)} decode "
        "the CTC head: set model.use_ctc: true (or drop them)"
    )


def wer_summary(part, method, key):
    """{EXP}/{method}/wer-summary-{part}-{key}-{AVG_NAME}.txt: the name `zipasr decode
    --result-dir {EXP}/{method} --suffix {AVG_NAME}` writes (zipasr.decode.names)."""
    return f"{EXP}/{method}/{result_file('wer-summary', part, key, AVG_NAME)}"


def decode_inputs(wildcards):
    """The averaged model, the cuts, the BPE model, and for the LM methods the LMs."""
    return {"model": f"{EXP}/{AVG_NAME}.pt", "cuts": cuts(wildcards.part),
            "bpe": f"{lang_dir()}/bpe.model", **lm_files(wildcards.method)}


def decode_args(wildcards, input):
    """The decoding options one job reads: the beam matters to the beam searches only, the
    LMs and their scales to the LM methods only."""
    args = f"--max-duration {DECODE['max_duration']}"
    if not wildcards.method.endswith("greedy_search"):
        args += f" --beam {BEAM}"
    scales = lm_scales(wildcards.method)
    if "lm_scale" in scales:
        args += f" --lm {input.lm} --lm-scale {scales['lm_scale']}"
    if "lodr_scale" in scales:
        args += f" --bigram {input.bigram} --lodr-scale {scales['lodr_scale']}"
    if wildcards.key in STREAMING:
        chunk, left = STREAMING[wildcards.key]
        args += (f" --streaming --chunk-size {chunk} --left-context-frames {left}"
                 f" --num-streams {DECODE.get('num_streams', 50)}")
    return args


rule decode:
    input:
        unpack(decode_inputs),
    output:
        wer_summary("{part}", "{method}", "{key}"),
    params:
        args=decode_args,
    log:
        f"logs/decode/{EXP_NAME}-{{part}}-{{method}}-{{key}}.log",
    benchmark:
        f"logs/decode/{EXP_NAME}-{{part}}-{{method}}-{{key}}.benchmark.tsv"
    wildcard_constraints:
        method="|".join(METHODS),
        # the keys `zipasr decode` writes for the configured beam and scales: a file of
        # another beam has no rule (instead of a job that would write a different name)
        key="|".join(re.escape(k) for keys in KEYS.values() for k in keys),
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
