"""One source per fact: where a fact is written in two places, the copies are held equal here.

* The config schema's ``model`` and ``train`` sections list exactly the fields of
  ``ZipformerConfig`` (plus ``preset``) and ``TrainConfig`` (plus the job-sizing keys), with
  types that match the fields' annotations, and every dataclass default passes the schema.
* The encoder takes its dimensions from the ZipformerConfig, not from defaults of its own.
* Every checkpoint file is opened by one function, ``zipasr.train.checkpoint.load_checkpoint``.
* The default corpus' sizes live in ``zipasr.data.synth.corpus.DEFAULT_SIZES``; the default config
  repeats them and the CLI and schema carry no copy.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import types
import typing
from typing import Any

import jsonschema
import pytest
import yaml
from helpers import ROOT

from zipasr.config import SCHEMA, load_config
from zipasr.model.config import ZipformerConfig
from zipasr.model.presets import PRESETS
from zipasr.train.config import JOB_KEYS, TrainConfig

SECTIONS = {
    # section: (dataclass, keys of the section that are not fields of it)
    "model": (ZipformerConfig, ("preset",)),
    "train": (TrainConfig, JOB_KEYS),
}


@pytest.fixture(scope="module")
def schema() -> dict[str, Any]:
    return yaml.safe_load(SCHEMA.read_text())


def _fields(cls: type) -> dict[str, Any]:
    """Field name -> resolved annotation (the modules use ``from __future__ import
    annotations``, so ``dataclasses.fields`` holds strings)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _schema_types(prop: dict[str, Any]) -> set[str]:
    """The JSON types a property admits: its ``type`` (one or a list), or its enum values'."""
    if "type" in prop:
        t = prop["type"]
        return set(t) if isinstance(t, list) else {t}
    names = {bool: "boolean", int: "integer", float: "number", str: "string",
             type(None): "null"}
    return {names[type(v)] for v in prop["enum"]}


def _expected(hint: Any) -> tuple[set[str], str | None]:
    """(the JSON types a field of this annotation is written as, the JSON type of its items
    for a tuple), or ``(set(), None)`` when the annotation has no rule here."""
    simple = {bool: "boolean", int: "integer", float: "number", str: "string",
              type(None): "null"}
    if hint in simple:
        return {simple[hint]}, None
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return {simple[a] for a in args}, None
    if origin is tuple:
        return {"array"}, simple[args[0]]
    if origin is dict:
        return {"object"}, None
    return set(), None


@pytest.mark.parametrize("section", SECTIONS)
def test_schema_lists_the_dataclass_fields(schema, section: str) -> None:
    cls, extra = SECTIONS[section]
    props = set(schema["properties"][section]["properties"])
    fields = set(_fields(cls))
    assert not fields & set(extra), f"{extra} are meant to be keys outside {cls.__name__}"
    assert props - fields - set(extra) == set(), \
        f"{section}: in the schema, not fields of {cls.__name__}"
    assert fields - props == set(), \
        f"{section}: fields of {cls.__name__} the schema does not list (no config can set them)"
    assert set(extra) <= props


@pytest.mark.parametrize("section", SECTIONS)
def test_schema_types_match_the_field_types(schema, section: str) -> None:
    cls, _ = SECTIONS[section]
    props = schema["properties"][section]["properties"]
    wrong = []
    for name, hint in _fields(cls).items():
        types_, items = _expected(hint)
        if not types_:
            continue
        got = _schema_types(props[name])
        if items is not None:  # a tuple: an array of its element type
            # per-stack fields may also be written "2,2,3" or 2 (ZipformerConfig parses both)
            if not ("array" in got and props[name].get("items", {}).get("type") == items):
                wrong.append(f"{name}: {hint} is an array of {items}, schema has {props[name]}")
            n = len(typing.get_args(hint))
            if n > 1 and Ellipsis not in typing.get_args(hint) and not (
                    props[name].get("minItems") == props[name].get("maxItems") == n):
                wrong.append(f"{name}: {hint} has {n} items, schema has {props[name]}")
        elif "enum" in props[name]:
            if not got <= types_:
                wrong.append(f"{name}: {hint}, schema enum {props[name]['enum']}")
        elif got != types_:
            wrong.append(f"{name}: {hint}, schema type {sorted(got)}")
    assert not wrong, "\n".join(wrong)


def _as_config(obj: Any) -> dict[str, Any]:
    """A dataclass as a config section would write it (tuples as lists)."""
    return {k: list(v) if isinstance(v, tuple) else v
            for k, v in dataclasses.asdict(obj).items()}


def test_dataclass_defaults_pass_the_schema(schema) -> None:
    props = schema["properties"]
    jsonschema.validate({"preset": "M", **_as_config(ZipformerConfig())}, props["model"])
    jsonschema.validate(_as_config(TrainConfig()), props["train"])


def test_schema_enums_are_what_the_code_accepts(schema) -> None:
    from zipasr.loss.backend import BACKENDS

    model, train = (schema["properties"][s]["properties"] for s in ("model", "train"))
    assert model["preset"]["enum"] == list(PRESETS)
    assert train["rnnt_backend"]["enum"] == list(BACKENDS)
    for key in ("precision", "joiner_bf16"):
        for value in train[key]["enum"]:
            assert getattr(TrainConfig.from_dict({key: value}), key) == value


# -- the encoder is built from the config ---------------------------------------------------


def test_encoder_takes_its_dimensions_from_the_config() -> None:
    from zipasr.model.transducer import Transducer
    from zipasr.model.zipformer import Zipformer2

    # a config is the only way in: no second set of dimensions with defaults of its own
    assert list(inspect.signature(Zipformer2).parameters) == ["config", "dropout"]
    cfg = ZipformerConfig.from_preset("xs", causal=True, chunk_size=(16, -1),
                                      left_context_frames=(64, -1))
    enc = Transducer(cfg).encoder
    n = len(cfg.downsampling_factor)
    for name in ("downsampling_factor", "encoder_dim", "encoder_unmasked_dim",
                 "num_encoder_layers", "num_heads", "query_head_dim", "value_head_dim",
                 "cnn_module_kernel"):
        want = getattr(cfg, name)
        assert getattr(enc, name) == (want * n if len(want) == 1 else want), name
    assert (enc.causal, enc.chunk_size, enc.left_context_frames) == (True, [16, -1], [64, -1])
    assert enc.encoders[0].encoder_pos.embed_dim == cfg.pos_dim
    first = enc.encoders[0].layers[0]
    assert first.self_attn_weights.pos_head_dim == cfg.pos_head_dim[0]
    assert first.feed_forward2.in_proj.out_features == cfg.feedforward_dim[0]


# -- one reader of checkpoint files ---------------------------------------------------------

# Files that still open checkpoints themselves (none: every reader calls load_checkpoint).
PENDING: set[str] = set()


def _torch_load_calls(path) -> list[tuple[int, str]]:
    """(line, enclosing function) of every ``torch.load(...)`` call in a source file."""
    tree = ast.parse(path.read_text())
    calls = []

    def visit(node: ast.AST, func: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                visit(child, child.name)
                continue
            if (isinstance(child, ast.Call) and isinstance(child.func, ast.Attribute)
                    and child.func.attr == "load" and isinstance(child.func.value, ast.Name)
                    and child.func.value.id == "torch"):
                calls.append((child.lineno, func))
            visit(child, func)

    visit(tree, "<module>")
    return calls


def test_checkpoints_are_opened_in_one_place() -> None:
    found = {}
    for path in sorted((ROOT / "src" / "zipasr").rglob("*.py")):
        calls = _torch_load_calls(path)
        if calls:
            found[str(path.relative_to(ROOT))] = calls
    assert set(found) - PENDING == {"src/zipasr/train/checkpoint.py"}, found
    assert {func for _, func in found["src/zipasr/train/checkpoint.py"]} == {"load_checkpoint"}


# -- the default corpus' sizes --------------------------------------------------------------


def test_corpus_sizes_have_one_source(schema) -> None:
    from zipasr.data.synth import cli as synth_cli
    from zipasr.data.synth import corpus as synth

    synth_cfg = load_config(ROOT / "config" / "config.yaml")["corpus"]["synth"]
    assert {k: synth_cfg[k] for k in synth.DEFAULT_SIZES} == synth.DEFAULT_SIZES
    for fn in (synth.plan_corpus, synth.synthesize_corpus):
        params = inspect.signature(fn).parameters
        assert {k: params[k].default for k in synth.DEFAULT_SIZES} == synth.DEFAULT_SIZES
    # the CLI and the schema carry no number of their own
    parser = argparse.ArgumentParser()
    synth_cli.register(parser.add_subparsers())
    args = parser.parse_args(["synth", "--audio-dir", "a", "--manifest-dir", "m"])
    assert all(getattr(args, k) is None for k in synth.DEFAULT_SIZES)
    props = schema["properties"]["corpus"]["properties"]["synth"]["properties"]
    assert not [k for k in synth.DEFAULT_SIZES if "default" in props[k]]
