# Deployment: the averaged model exported to ONNX for sherpa-onnx (docs/deploy.md). In `all`
# unless export.onnx is false; `snakemake {exp_dir}/onnx` builds it on demand either way.


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
    log:
        f"logs/export/{EXP_NAME}.log",
    benchmark:
        f"logs/export/{EXP_NAME}.benchmark.tsv"
    threads: 1
    shell:
        "OMP_NUM_THREADS={threads} zipasr export-onnx --model {input.model}"
        " --bpe-model {input.bpe} --out-dir {output} {params.int8} --opset {params.opset}"
        " 2> {log}"
