# Deployment: the averaged model exported to ONNX for sherpa-onnx (docs/deploy.md). In `all`
# unless export.onnx is false; `snakemake {exp_dir}/onnx` builds it on demand either way.


def export_streaming_pair():
    """A causal model exports for sherpa-onnx's OnlineRecognizer, with one chunk size and left
    context: export.streaming, else the first decode.streaming pair, else icefall's 16 / 128.
    None for a non-causal model."""
    if not MODEL_CONFIG.causal:
        return None
    s = EXPORT.get("streaming") or (config["decode"].get("streaming") or [None])[0]
    return (s["chunk_size"], s["left_context_frames"]) if s else (16, 128)


EXPORT_PAIR = export_streaming_pair()
if EXPORT_PAIR:  # checked at load, like decode.streaming
    check_chunks([EXPORT_PAIR], "export")


rule export:
    input:
        model=f"{EXP}/{AVG_NAME}.pt",
        bpe=f"{lang_dir()}/bpe.model",
    output:
        directory(f"{EXP}/onnx"),
    params:
        # what changes the files; export.onnx only decides whether `all` asks for them
        int8="--int8" if EXPORT["int8"] else "--no-int8",
        opset=EXPORT["opset"],
        streaming=(f"--streaming --chunk-size {EXPORT_PAIR[0]} --left-context-frames "
                   f"{EXPORT_PAIR[1]}" if EXPORT_PAIR else ""),
    log:
        f"logs/export/{EXP_NAME}.log",
    benchmark:
        f"logs/export/{EXP_NAME}.benchmark.tsv"
    threads: 1
    shell:
        "OMP_NUM_THREADS={threads} zipasr export-onnx --model {input.model}"
        " --bpe-model {input.bpe} --out-dir {output} {params.int8} --opset {params.opset}"
        " {params.streaming}"
        " 2> {log}"
