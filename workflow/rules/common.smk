# Paths and config lookups shared by the rule files. Rules read config only through these.
# Model and result file names come from zipasr.decode.names, which `zipasr decode` writes with.
from snakemake.exceptions import WorkflowError

from zipasr.data.musan import PARTS as MUSAN_PARTS  # icefall's: music, speech, noise
from zipasr.decode.names import CTC_METHODS, LM_METHODS, METHODS, model_name, result_file, result_key
from zipasr.model.config import ZipformerConfig

D = config["data_dir"]
CORPUS = config["corpus"]
PREFIX = CORPUS["prefix"]
TRAIN_PARTS = CORPUS["train_parts"]
EVAL_PARTS = list(dict.fromkeys(CORPUS["dev_parts"] + CORPUS["test_parts"]))
ALL_PARTS = list(dict.fromkeys(TRAIN_PARTS + EVAL_PARTS))
STRICT = "--strict" if config["strict"] else ""
EXP = config["exp_dir"].rstrip("/")
EXP_NAME = EXP.replace("/", "_")
# The last epoch averaged (icefall's --epoch): average.epoch, else the last one trained.
# icefall's streaming run averages epoch 30 of 40.
AVG_EPOCH = config["average"].get("epoch", config["train"]["num_epochs"])
if AVG_EPOCH > config["train"]["num_epochs"]:
    raise WorkflowError(
        f"average.epoch {AVG_EPOCH} is after the last epoch trained, train.num_epochs "
        f"{config['train']['num_epochs']}: epoch-{AVG_EPOCH}.pt would never be written"
    )
# The model's dimensions, checked now rather than when the train job builds the model after
# data preparation (e.g. a causal model's chunk lists); zipasr.model.config loads without torch
try:
    MODEL_CONFIG = ZipformerConfig.from_dict(config["model"])
except (KeyError, TypeError, ValueError) as e:
    raise WorkflowError(f"model: {e}") from None
# ONNX export settings (export.smk); config.yaml has them all, the defaults only cover a config
# that bypasses it
EXPORT = {"onnx": True, "int8": True, "opset": 13, **config.get("export", {})}

if CORPUS["name"] == "synth" and set(ALL_PARTS) - {"train", "dev", "test"}:
    raise ValueError(
        f"corpus.name synth has parts train, dev and test only; got {ALL_PARTS}"
    )
# LibriSpeech parts are checked now, not by the download job. A LibriSpeech 960 h overlay
# (config/librispeech-960-{S,M,L}.yaml) given without its base has config/config.yaml's
# synthetic-corpus parts: say which file to add rather than train an icefall model on them.
if CORPUS["name"] == "librispeech":
    from zipasr.data.librispeech import FULL_PARTS, MINI_PARTS

    _unknown = [p for p in ALL_PARTS if p not in MINI_PARTS + FULL_PARTS]
    if _unknown:
        _hint = ""
        if set(ALL_PARTS) <= {"train", "dev", "test"}:
            _hint = (
                "; these are config/config.yaml's synthetic-corpus parts: the LibriSpeech 960 h"
                " recipes config/librispeech-960-{S,M,L}.yaml are overlays of"
                " config/librispeech-960.yaml, which sets the parts: give it first, e.g."
                " --configfile config/librispeech-960.yaml config/librispeech-960-M.yaml"
            )
        raise WorkflowError(
            f"corpus.name librispeech: unknown part(s) {', '.join(_unknown)}"
            f" (known: {', '.join(MINI_PARTS + FULL_PARTS)}){_hint}"
        )
# The model's output size is the BPE model's (zipasr train rejects a model.vocab_size that
# disagrees with it): a different model.vocab_size is a mistake, caught before any job runs
if "vocab_size" in config["model"] and config["model"]["vocab_size"] != config["bpe"]["vocab_size"]:
    raise WorkflowError(
        f"model.vocab_size {config['model']['vocab_size']} disagrees with bpe.vocab_size "
        f"{config['bpe']['vocab_size']}: the model's output size is the BPE model's; "
        f"drop model.vocab_size (or set it to {config['bpe']['vocab_size']})"
    )
# average.last_batches: the last N batches of the epoch instead of whole epochs. The start is a
# checkpoint-B.pt at least N batches before the end, so enough of them must survive pruning
# (the newest keep_last_k, every save_every_n batches); checked now, not after training
# (after the corpus checks: an overlay given without its base is named first).
LAST_BATCHES = config["average"].get("last_batches")
if LAST_BATCHES is not None:
    if not config["average"]["use_averaged_model"]:
        raise WorkflowError("average.last_batches needs average.use_averaged_model: true")
    _keep = config["train"].get("keep_last_k", 30)
    _every = config["train"].get("save_every_n", 4000)
    if AVG_EPOCH != config["train"]["num_epochs"] and _keep > 0:
        raise WorkflowError(
            "average.last_batches with average.epoch before the last epoch needs "
            "train.keep_last_k: 0 (keep every checkpoint): later ones would prune its window")
    if _keep > 0 and (_keep - 1) * _every < LAST_BATCHES:
        raise WorkflowError(
            f"average.last_batches {LAST_BATCHES} reaches further back than the checkpoints "
            f"kept: train.keep_last_k {_keep} x save_every_n {_every} batches; raise "
            f"keep_last_k to at least {-(-LAST_BATCHES // _every) + 1}")
AVG_NAME = model_name(AVG_EPOCH, config["average"]["avg"], config["average"]["use_averaged_model"],
                      LAST_BATCHES)


wildcard_constraints:
    prefix=r"[A-Za-z0-9][A-Za-z0-9-]*",
    part=r"[A-Za-z0-9][A-Za-z0-9-]*",
    vocab=r"\d+",


def manifest(kind, part, prefix=PREFIX):
    return f"{D}/manifests/{prefix}_{kind}_{part}.jsonl.gz"


def cuts(part, prefix=PREFIX):
    return f"{D}/fbank/{prefix}_cuts_{part}.jsonl.gz"


def all_cuts():
    """Every part's cut manifest, and MUSAN's noise cuts when training mixes them in."""
    return [cuts(p) for p in ALL_PARTS] + ([musan_cuts()] if MUSAN else [])


# features.num_splits: a train part's fbank in this many jobs (data.smk: split_manifests,
# fbank_shard, gather_fbank); 1 is the single fbank job per part
NUM_SPLITS = config["features"].get("num_splits", 1)


def split_dir(kind):
    """Where a train part's pieces go: manifests or fbank, under split{N}/ (so another N never
    reads the pieces of the last)."""
    return f"{D}/{kind}/split{NUM_SPLITS}"


# MUSAN noise (data.smk: download_musan, prepare_musan, fbank_musan), mixed into training
MUSAN = CORPUS.get("musan", {}).get("enabled", False)
if MUSAN and config["train"].get("noise_cuts"):
    raise WorkflowError(
        "corpus.musan.enabled and train.noise_cuts both give training its noise: set one"
    )


def check_chunks(pairs, what):
    """Stop the DAG when it loads unless the model can decode with each (chunk, left context)
    pair (zipasr.model.config.check_chunking: decode.streaming, the streaming export)."""
    from zipasr.errors import ZipasrError
    from zipasr.model.config import check_chunking

    try:
        for chunk, left in pairs:
            check_chunking(MODEL_CONFIG, chunk, left)
    except ZipasrError as e:
        raise WorkflowError(f"{what}: {e}") from None


def musan_cuts():
    return f"{D}/fbank/musan_cuts.jsonl.gz"


def lang_dir():
    return f"{D}/lang_bpe_{config['bpe']['vocab_size']}"


def lang_files():
    return [f"{lang_dir()}/bpe.model", f"{lang_dir()}/tokens.txt"]
