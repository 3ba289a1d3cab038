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


# features.num_splits > 1: a train part's fbank as N jobs (a cluster spreads them over nodes).
# Its manifests are split by recording into N pieces, each piece goes through the fbank rule's
# own command, and the pieces' cut manifests are gathered into the part's
# {prefix}_cuts_{part}.jsonl.gz, in the order one fbank job writes them (zipasr.data.shards).
# The pieces live under split{N}/, so changing N reruns these rules for the train parts and
# whatever reads their cuts, never the download or the manifests.
if NUM_SPLITS > 1:
    import re

    _TRAIN_PART = "|".join(re.escape(p) for p in TRAIN_PARTS)
    _PIECES = range(NUM_SPLITS)

    def _piece(kind, i, root):
        return f"{split_dir(root)}/{{prefix}}_{kind}_{{part}}.{i}.jsonl.gz"

    rule split_manifests:
        input:
            recordings=manifest("recordings", "{part}", "{prefix}"),
            supervisions=manifest("supervisions", "{part}", "{prefix}"),
        output:
            recordings=[_piece("recordings", i, "manifests") for i in _PIECES],
            supervisions=[_piece("supervisions", i, "manifests") for i in _PIECES],
        log:
            "logs/fbank/{prefix}_{part}.split.log",
        benchmark:
            "logs/fbank/{prefix}_{part}.split.benchmark.tsv"
        wildcard_constraints:
            part=_TRAIN_PART,
        shell:
            "zipasr split-manifests --recordings {input.recordings}"
            " --supervisions {input.supervisions} --num-splits " + str(NUM_SPLITS) +
            " --out-dir " + split_dir("manifests") +
            " --prefix {wildcards.prefix} --part {wildcards.part} 2> {log}"

    rule fbank_shard:
        """One piece of a train part through the fbank rule's command (same options)."""
        input:
            recordings=_piece("recordings", "{shard}", "manifests"),
            supervisions=_piece("supervisions", "{shard}", "manifests"),
        output:
            cuts=_piece("cuts", "{shard}", "fbank"),
            feats=directory(f"{split_dir('fbank')}/{{prefix}}_feats_{{part}}.{{shard}}"),
            summary=f"{split_dir('fbank')}/{{prefix}}_summary_{{part}}.{{shard}}.json",
        params:
            f=fbank_params,
        log:
            "logs/fbank/{prefix}_{part}.{shard}.log",
        benchmark:
            "logs/fbank/{prefix}_{part}.{shard}.benchmark.tsv"
        wildcard_constraints:
            part=_TRAIN_PART,
            shard=r"\d+",
        threads: config["features"]["num_jobs"]
        # the Slurm profile's fbank resources (workflow/profiles/slurm: 3000 MB per thread,
        # 12 h); a profile's set-resources entry for fbank_shard overrides them
        resources:
            mem_mb=lambda wildcards, threads: 3000 * threads,
            runtime=720,
        shell:
            rules.fbank.rule.shellcmd

    rule gather_fbank:
        input:
            cuts=[_piece("cuts", i, "fbank") for i in _PIECES],
            summaries=[f"{split_dir('fbank')}/{{prefix}}_summary_{{part}}.{i}.json"
                       for i in _PIECES],
        output:
            # the fbank rule's outputs: the pieces' features are linked into the part's
            # directory, so the files are the same whichever num_splits made them
            cuts=f"{D}/fbank/{{prefix}}_cuts_{{part}}.jsonl.gz",
            feats=directory(f"{D}/fbank/{{prefix}}_feats_{{part}}"),
            summary=f"{D}/fbank/{{prefix}}_summary_{{part}}.json",
        log:
            "logs/fbank/{prefix}_{part}.gather.log",
        benchmark:
            "logs/fbank/{prefix}_{part}.gather.benchmark.tsv"
        wildcard_constraints:
            part=_TRAIN_PART,
        shell:
            "zipasr gather-cuts --cuts {input.cuts} --summaries {input.summaries}"
            " --out-cuts {output.cuts} --storage-dir {output.feats} --summary {output.summary}"
            " 2> {log}"

    # a train part's cuts come from its pieces; the other parts' from rule fbank
    ruleorder: gather_fbank > fbank


# corpus.musan.enabled: MUSAN noise for training, as icefall's recipe prepares it
# (zipasr.data.musan): downloaded from {base_url}/17/musan.tar.gz, manifests of its music,
# speech and noise, and fbank of their 10 s windows longer than 5 s, with the training features'
# options. The train rule mixes these cuts in (train.noise_cuts).
if MUSAN:

    rule download_musan:
        output:
            # lhotse's marker, touched after extraction: a killed download leaves none
            f"{D}/download/.musan_completed",
        log:
            "logs/download/musan.log",
        benchmark:
            "logs/download/musan.benchmark.tsv"
        # like download_librispeech's in the Slurm profile: the archive is 11 GB
        resources:
            mem_mb=2000,
            runtime=360,
        # the mirror is read from config, not params: another mirror must not download again
        shell:
            "zipasr download-musan --target-dir {D}/download"
            " --base-url {config[corpus][musan][base_url]}"
            + (" --keep-archive" if CORPUS["musan"].get("keep_archives") else "")
            + " 2> {log}"

    rule prepare_musan:
        input:
            f"{D}/download/.musan_completed",
        output:
            [f"{D}/manifests/musan_recordings_{part}.jsonl.gz" for part in MUSAN_PARTS],
        log:
            "logs/manifests/musan.log",
        benchmark:
            "logs/manifests/musan.benchmark.tsv"
        shell:
            "zipasr prepare-musan --corpus-dir {D}/download/musan --manifest-dir {D}/manifests"
            " 2> {log}"

    rule fbank_musan:
        input:
            [f"{D}/manifests/musan_recordings_{part}.jsonl.gz" for part in MUSAN_PARTS],
        output:
            cuts=musan_cuts(),
            feats=directory(f"{D}/fbank/musan_feats"),
            summary=f"{D}/fbank/musan_summary.json",
        params:
            # what the noise features share with the speech features they are mixed into
            f={k: config["features"].get(k, d)
               for k, d in (("num_mel_bins", 80), ("frame_shift", 0.01), ("dither", 0.0))},
        log:
            "logs/fbank/musan.log",
        benchmark:
            "logs/fbank/musan.benchmark.tsv"
        threads: config["features"]["num_jobs"]
        # the Slurm profile's fbank resources (3000 MB per thread); 109 h of audio
        resources:
            mem_mb=lambda wildcards, threads: 3000 * threads,
            runtime=240,
        shell:
            "zipasr fbank-musan --recordings {input} --out-cuts {output.cuts}"
            " --storage-dir {output.feats} --summary {output.summary}"
            " --num-mel-bins {params.f[num_mel_bins]} --frame-shift {params.f[frame_shift]}"
            " --dither {params.f[dither]} --num-jobs {threads} 2> {log}"
