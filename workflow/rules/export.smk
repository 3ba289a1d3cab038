# Deployment: the averaged model exported to ONNX for sherpa-onnx (docs/deploy.md). In `all`
# unless export.onnx is false; `snakemake {exp_dir}/onnx` builds it on demand either way.


def export_streaming_args():
    """A causal model exports for sherpa-onnx's OnlineRecognizer, with one chunk size and left
    context: export.streaming, else the first decode.streaming pair, else icefall's 16 / 128."""
    if not config["model"].get("causal", False):
        return ""
    s = EXPORT.get("streaming") or (config["decode"].get("streaming") or [None])[0]
    chunk, left = (s["chunk_size"], s["left_context_frames"]) if s else (16, 128)
    return f"--streaming --chunk-size {chunk} --left-context-frames {left}"


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
        streaming=export_streaming_args(),
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
