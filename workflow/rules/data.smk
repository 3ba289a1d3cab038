# Data stages: corpus (synthesized or downloaded) → lhotse manifests → cuts + speed perturbation
# + fbank. A rule's params carry exactly the config it reads, so only what a change touches reruns.

if CORPUS["name"] == "synth":

    rule synth:
        output:
            [manifest(kind, part) for part in ("train", "dev", "test")
             for kind in ("recordings", "supervisions")],
        params:
            # num_jobs sizes the job (threads) only: the corpus is the same whatever it is
            synth={k: v for k, v in CORPUS["synth"].items() if k != "num_jobs"},
            prefix=PREFIX,
        log:
            "logs/synth/synth.log",
        benchmark:
            "logs/synth/synth.benchmark.tsv"
        threads: CORPUS["synth"]["num_jobs"]
        shell:
            "zipasr synth --audio-dir {D}/corpus/{params.prefix} --manifest-dir {D}/manifests"
            " --prefix {params.prefix} --seed {params.synth[seed]}"
            " --num-train {params.synth[num_train]} --num-dev {params.synth[num_dev]}"
            " --num-test {params.synth[num_test]} --num-jobs {threads} 2> {log}"

else:

    rule download_librispeech:
        output:
            f"{D}/download/LibriSpeech/{{part}}/.completed",
        log:
            "logs/download/{part}.log",
        benchmark:
            "logs/download/{part}.benchmark.tsv"
        # The mirror is read from config here, not from params: moving to another mirror must
        # not download a completed part again.
        shell:
            "zipasr download-librispeech --target-dir {D}/download --part {wildcards.part}"
            " --base-url {config[corpus][librispeech][base_url]}"
            + (" --keep-archive" if CORPUS["librispeech"].get("keep_archives") else "")
            + " 2> {log}"

    rule prepare_librispeech:
        input:
            f"{D}/download/LibriSpeech/{{part}}/.completed",
        output:
            recordings=manifest("recordings", "{part}"),
            supervisions=manifest("supervisions", "{part}"),
        params:
            strict=config["strict"],
        log:
            "logs/manifests/{part}.log",
        benchmark:
            "logs/manifests/{part}.benchmark.tsv"
        shell:
            "zipasr prepare-librispeech --corpus-dir {D}/download/LibriSpeech --part {wildcards.part}"
            " --manifest-dir {D}/manifests --prefix {PREFIX} {STRICT} 2> {log}"


def fbank_params(wildcards):
    """The feature config one part reads: speed perturbation applies to train parts only.
    features.on_the_fly: the train parts' cuts carry their audio only (`zipasr fbank
    --no-features`; training computes the features); the key is there only then, so the params
    of a config without it stay as they were (no rerun)."""
    f = config["features"]
    speeds = f["speed_perturb"] if wildcards.part in TRAIN_PARTS else []
    params = {
        "num_mel_bins": f["num_mel_bins"],
        "frame_shift": f.get("frame_shift", 0.01),
        "dither": f.get("dither", 0.0),
        "speed_perturb": " ".join(str(s) for s in speeds),
        "strict": config["strict"],
    }
    if f.get("on_the_fly"):
        params["features"] = "--no-features" if wildcards.part in TRAIN_PARTS else ""
    return params


rule fbank:
    input:
        recordings=manifest("recordings", "{part}", "{prefix}"),
        supervisions=manifest("supervisions", "{part}", "{prefix}"),
    output:
        cuts=f"{D}/fbank/{{prefix}}_cuts_{{part}}.jsonl.gz",
        feats=directory(f"{D}/fbank/{{prefix}}_feats_{{part}}"),
        summary=f"{D}/fbank/{{prefix}}_summary_{{part}}.json",
    params:
        f=fbank_params,
    log:
        "logs/fbank/{prefix}_{part}.log",
    benchmark:
        "logs/fbank/{prefix}_{part}.benchmark.tsv"
    threads: config["features"]["num_jobs"]
    shell:
        "zipasr fbank --recordings {input.recordings} --supervisions {input.supervisions}"
        " --out-cuts {output.cuts} --storage-dir {output.feats} --summary {output.summary}"
        " --num-mel-bins {params.f[num_mel_bins]} --frame-shift {params.f[frame_shift]}"
        " --dither {params.f[dither]} --speed-perturb {params.f[speed_perturb]}"
        " --num-jobs {threads} {STRICT}"
        + (" {params.f[features]}" if config["features"].get("on_the_fly") else "")
        + " 2> {log}"
