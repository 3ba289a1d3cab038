# Training and checkpoint averaging. Checkpoints (epoch-N.pt, checkpoint-B.pt) are not rule
# outputs: Snakemake deletes a rule's outputs before rerunning it, and a killed training job
# must resume from them. The rule's output is the run summary, written last.

import json

from zipasr.train.config import training_options


def train_procs(wildcards, resources):
    """DDP processes per node: one per GPU the job was given (the Slurm profile's `gpu`, the
    job's total, on one node; or `gres: gpu:[model:]N`, N per node, on several), else
    train.num_procs gloo processes on the CPU. One runs plain `zipasr train`; more relaunch it
    through torchrun (zipasr.train.launch). A params value: the world size changes the result
    (total batch, batch-count adjustment), so changing it retrains."""
    gpus = int(resources.get("gpu", 0) or 0)
    gres = str(resources.get("gres", "") or "")
    if gres.startswith("gpu"):
        gpus = int(gres.split(":")[-1]) if gres.split(":")[-1].isdigit() else 1
    if gpus:
        return gpus
    return int(config["train"].get("num_procs", 1))


rule train:
    input:
        train=[cuts(p) for p in TRAIN_PARTS],
        valid=[cuts(p) for p in CORPUS["dev_parts"]],
        bpe=f"{lang_dir()}/bpe.model",
        # corpus.musan.enabled: the noise cuts mixed in, TrainConfig's noise_cuts (below)
        noise=[musan_cuts()] if MUSAN else [],
    output:
        summary=f"{EXP}/train-summary.json",
    params:
        model=json.dumps(config["model"], sort_keys=True),
        train=json.dumps({**training_options(config["train"]),
                          **({"noise_cuts": musan_cuts()} if MUSAN else {})}, sort_keys=True),
        nproc=train_procs,
        # features.on_the_fly: the train cuts have no features (rule fbank); the loader computes
        # them with these options. Only then a param, so other configs' params stay as they were
        **({"fbank": json.dumps({k: config["features"].get(k, d) for k, d in (
            ("num_mel_bins", 80), ("frame_shift", 0.01), ("dither", 0.0))}, sort_keys=True)}
           if config["features"].get("on_the_fly") else {}),
    log:
        f"logs/train/{EXP_NAME}.log",
    benchmark:
        f"logs/train/{EXP_NAME}.benchmark.tsv"
    threads: config["train"].get("threads", 2)
    shell:
        # the job's CPU threads; with several processes zipasr.train.launch splits them
        "OMP_NUM_THREADS={threads} zipasr train --nproc-per-node {params.nproc}"
        " --train-cuts {input.train} --valid-cuts {input.valid} --bpe-model {input.bpe} --exp-dir {EXP}"
        " --model {params.model:q} --train {params.train:q} --summary {output.summary}"
        + (" --on-the-fly-features {params.fbank:q}" if config["features"].get("on_the_fly")
           else "")
        + " 2> {log}"


rule average:
    input:
        f"{EXP}/train-summary.json",
    output:
        f"{EXP}/{AVG_NAME}.pt",
    params:
        avg=config["average"],
        epoch=AVG_EPOCH,
    log:
        f"logs/average/{EXP_NAME}-{AVG_NAME}.log",
    benchmark:
        f"logs/average/{EXP_NAME}-{AVG_NAME}.benchmark.tsv"
    shell:
        "zipasr average --exp-dir {EXP} --epoch {params.epoch}"
        + (f" --last-batches {LAST_BATCHES}" if LAST_BATCHES is not None
           else " --avg {params.avg[avg]}")
        + (" --use-averaged-model" if config["average"]["use_averaged_model"]
           else " --no-use-averaged-model")
        + " --out {output} 2> {log}"
