"""Config validation with messages that name the key: ``bpe.vocab_sze: unknown key (did you
mean 'vocab_size'?)`` instead of a schema dump. Used by the Snakefile before anything runs."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import yaml

from zipasr.errors import ZipasrError

SCHEMA = Path(__file__).resolve().parents[2] / "workflow" / "schemas" / "config.schema.yaml"


def _dotted(path) -> str:
    return ".".join(str(p) for p in path) or "<top level>"


def config_errors(config: dict[str, Any], schema: dict[str, Any]) -> list[str]:
    """Every schema violation as one line naming the offending key."""
    import jsonschema

    validator_cls = jsonschema.validators.validator_for(schema)
    validator = validator_cls(schema)
    messages = []
    for err in sorted(validator.iter_errors(config), key=lambda e: list(map(str, e.path))):
        where = _dotted(err.absolute_path)
        if err.validator == "additionalProperties":
            allowed = sorted(err.schema.get("properties", {}))
            extra = sorted(set(err.instance) - set(allowed))
            for key in extra:
                hint = difflib.get_close_matches(key, allowed, n=1)
                key_path = f"{where}.{key}" if err.absolute_path else key
                suggestion = f" (did you mean {hint[0]!r}?)" if hint else ""
                messages.append(
                    f"{key_path}: unknown key{suggestion}; allowed here: {', '.join(allowed)}"
                )
        elif err.validator == "required":
            messages.append(f"{where}: {err.message}")
        else:
            messages.append(f"{where}: {err.message}")
    return messages


def validate_config(config: dict[str, Any], schema_path: str | Path = SCHEMA) -> None:
    """Raise :class:`ZipasrError` listing every problem, each with its dotted key."""
    schema = yaml.safe_load(Path(schema_path).read_text())
    errors = config_errors(config, schema)
    if errors:
        raise ZipasrError("invalid config:\n  " + "\n  ".join(errors))


def check_fields(cls: type, d: dict[str, Any], what: str,
                 error: type[Exception] = ZipasrError) -> None:
    """Raise ``error`` when ``d`` has keys that are not fields of the dataclass ``cls``, naming
    each with the closest field when one is close:
    ``unknown training option(s): num_epoch (did you mean 'num_epochs'?), foo``."""
    import dataclasses

    fields = sorted(f.name for f in dataclasses.fields(cls))
    unknown = sorted(set(d) - set(fields))
    if unknown:
        named = []
        for key in unknown:
            hint = difflib.get_close_matches(key, fields, n=1)
            named.append(f"{key} (did you mean {hint[0]!r}?)" if hint else key)
        raise error(f"{what}: {', '.join(named)}")


def load_config(*paths: str | Path) -> dict[str, Any]:
    """Load YAML files merged left to right (dicts deep-merged, like Snakemake's --configfile)."""
    merged: dict[str, Any] = {}
    for p in paths:
        merge_into(merged, yaml.safe_load(Path(p).read_text()) or {})
    return merged


def merge_into(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            merge_into(base[key], value)
        else:
            base[key] = value
    return base
