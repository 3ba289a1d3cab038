"""The names of the averaged model and of the result files, built here only: the workflow's
rules (which declare the files) and ``zipasr decode`` (which writes them) both call these, so
the two cannot drift apart. No heavy imports: the Snakefile imports this module.

* averaged model: ``epoch-{E}_avg-{A}[_use-averaged-model]`` (icefall's ``--epoch``/``--avg``
  suffix; ``epoch-{E}_last-{N}-batches_use-averaged-model`` for ``zipasr average
  --last-batches N``), the ``.pt`` file's stem and the result files' suffix;
* result key: ``greedy_search`` or ``modified_beam_search_beam-size-{beam}`` (icefall's), LM
  methods with their scales, streaming ones with ``-chunk-{C}-left-context-{L}``;
* result file: ``{kind}-{test_set}-{key}[-{suffix}].txt``, kind one of :data:`RESULT_KINDS`.
"""

from __future__ import annotations

RESULT_KINDS = ("recogs", "errs", "wer-summary")

METHODS = ("greedy_search", "modified_beam_search", "modified_beam_search_lm_shallow_fusion",
           "modified_beam_search_LODR", "ctc_greedy_search", "ctc_prefix_beam_search")
"""The decoding methods of ``zipasr decode`` (icefall's names for the transducer's)."""
BEAM_METHODS = ("modified_beam_search", "modified_beam_search_lm_shallow_fusion",
                "modified_beam_search_LODR")
"""The transducer's modified beam search, plain and with an LM: what hotwords bias."""
LM_METHODS = ("modified_beam_search_lm_shallow_fusion", "modified_beam_search_LODR")
"""The methods that need the neural LM (LODR also the bigram)."""
CTC_METHODS = ("ctc_greedy_search", "ctc_prefix_beam_search")
"""The methods that decode the CTC head (a model trained with ``model.use_ctc``)."""


def model_name(epoch: int, avg: int, use_averaged_model: bool,
               last_batches: int | None = None) -> str:
    """``epoch-30_avg-9_use-averaged-model``, ``epoch-1_avg-1``; averaged over the last
    batches of the epoch instead of whole epochs:
    ``epoch-2_last-1000-batches_use-averaged-model``."""
    span = f"last-{last_batches}-batches" if last_batches is not None else f"avg-{avg}"
    return f"epoch-{epoch}_{span}" + ("_use-averaged-model" if use_averaged_model else "")


def result_key(method: str, beam: int, chunk_size: int | None = None,
               left_context_frames: int | None = None, simulated: bool = False, *,
               lm_scale: float | None = None, lodr_scale: float | None = None,
               hotwords_score: float | None = None) -> str:
    """``greedy_search``; ``modified_beam_search_beam-size-4`` (the beam matters to the beam
    searches only, ``ctc_prefix_beam_search_beam-size-4`` too); hotwords add
    ``-hotwords-score-{S}``; the LM methods add icefall's ``_rnn-lm-scale-{X}`` and LODR
    ``_LODR-2gram-scale-{Y}``; a causal model's chunk-wise streaming results add the chunk and
    left context (icefall's suffix, in 50 Hz frames): ``greedy_search-chunk-16-left-context-128``,
    and its whole-utterance simulation of them ``...-left-context-128-simulated``."""
    key = method if method.endswith("greedy_search") else f"{method}_beam-size-{beam}"
    if hotwords_score is not None:
        key += f"-hotwords-score-{hotwords_score}"
    if lm_scale is not None:
        key += f"_rnn-lm-scale-{lm_scale}"
    if lodr_scale is not None:
        key += f"_LODR-2gram-scale-{lodr_scale}"
    if chunk_size is None:
        return key
    key += f"-chunk-{chunk_size}-left-context-{left_context_frames}"
    return key + "-simulated" if simulated else key


def result_name(test_set: str, key: str, suffix: str | None = None) -> str:
    """``{test_set}-{key}[-{suffix}]``: the part of a result file name after its kind."""
    return f"{test_set}-{key}" + (f"-{suffix}" if suffix else "")


def result_file(kind: str, test_set: str, key: str, suffix: str | None = None) -> str:
    """``wer-summary-test-greedy_search-epoch-30_avg-9.txt`` (a file name, no directory).
    Wildcards pass through: ``result_file("recogs", "{part}", "{key}")``."""
    if kind not in RESULT_KINDS:
        raise ValueError(f"result file kind {kind!r} is not one of {RESULT_KINDS}")
    return _file(kind, result_name(test_set, key, suffix))


def _file(kind: str, name: str) -> str:
    return f"{kind}-{name}.txt"


def parse_result_file(filename: str) -> tuple[str, str]:
    """(kind, name) of a :func:`result_file` name: ``("wer-summary", "test-greedy_search")``
    from ``wer-summary-test-greedy_search.txt``. ValueError for any other name."""
    for kind in RESULT_KINDS:
        if filename.startswith(f"{kind}-") and filename.endswith(".txt"):
            return kind, filename[len(kind) + 1:-len(".txt")]
    raise ValueError(f"{filename} is not named {{{'|'.join(RESULT_KINDS)}}}-"
                     "{test_set}-{key}[-{suffix}].txt")


def sibling_result_files(filename: str) -> list[str]:
    """The recogs, errs and wer-summary file names of the decoding ``filename`` belongs to."""
    _, name = parse_result_file(filename)
    return [_file(kind, name) for kind in RESULT_KINDS]


def split_result_name(name: str, key: str) -> tuple[str, str]:
    """``("test-clean", "greedy_search-epoch-1_avg-1")`` from the ``name`` of
    :func:`result_name` and the ``key`` its file holds: (test set, key[-suffix]). The test set
    is what precedes the last ``-{key}``: test set names may hold dashes."""
    pos = name.rfind(f"-{key}")
    return (name[:pos], name[pos + 1:]) if pos > 0 else (name, key)
