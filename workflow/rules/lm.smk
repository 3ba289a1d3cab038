# The language models of decoding's LM methods (decode.methods modified_beam_search_lm_*,
# modified_beam_search_LODR): an RNN-LM over the BPE tokens and a Kneser-Ney bigram of them
# (LODR's estimate of the transducer's internal LM), trained on the training transcripts only:
# dev text measures perplexity, test text is never read. They depend on the text and the BPE
# model, not on the acoustic model, so they live with the data (versioned by DVC) and train
# while the acoustic model does when cores allow.
import json

# zipasr train-lm's options (config lm.*; flags of the same names, `_` as `-`)
LM_OPTIONS = {k: v for k, v in config.get("lm", {}).items() if k != "threads"}


def lm_dir():
    return f"{D}/lm_bpe_{config['bpe']['vocab_size']}"


def lm_files(method):
    """What a decoding job of `method` reads besides the model: the LM methods their LMs."""
    if method not in LM_METHODS:
        return {}
    files = {"lm": f"{lm_dir()}/lm.pt"}
    if method == "modified_beam_search_LODR":
        files["bigram"] = f"{lm_dir()}/bigram.arpa"
    return files


def lm_flags(options):
    flags = []
    for key, value in sorted(options.items()):
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            flags.append(flag if value else flag.replace("--", "--no-", 1))
        else:
            flags.append(f"{flag} {value}")
    return " ".join(flags)


rule lm:
    input:
        train=[manifest("supervisions", p) for p in TRAIN_PARTS],
        valid=[manifest("supervisions", p) for p in CORPUS["dev_parts"]],
        bpe=f"{lang_dir()}/bpe.model",
    output:
        lm=f"{lm_dir()}/lm.pt",
        bigram=f"{lm_dir()}/bigram.arpa",
        summary=f"{lm_dir()}/lm-summary.json",
    params:
        options=json.dumps(LM_OPTIONS, sort_keys=True),  # a change retrains
        flags=lm_flags(LM_OPTIONS),
        out_dir=lm_dir(),
    log:
        f"logs/lm/lm_bpe_{config['bpe']['vocab_size']}.log",
    benchmark:
        f"logs/lm/lm_bpe_{config['bpe']['vocab_size']}.benchmark.tsv"
    threads: config.get("lm", {}).get("threads", 1)
    shell:
        "zipasr train-lm --supervisions {input.train} --valid-supervisions {input.valid}"
        " --bpe-model {input.bpe} --out-dir {params.out_dir} {params.flags}"
        " --num-threads {threads} {STRICT} 2> {log}"
