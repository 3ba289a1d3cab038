"""Loading a Zipformer transducer to decode, transcribe or export.

Model files: a trainer checkpoint (``epoch-N.pt``/``checkpoint-B.pt``), an averaged model from
``zipasr average`` (both carry ``model_config``), or icefall's ``pretrained.pt`` (only
``{"model": ...}``: the configuration comes from a preset / JSON given on the command line).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from zipasr.decode.average import strip_ddp_prefix
from zipasr.errors import ZipasrError
from zipasr.train.checkpoint import load_checkpoint

log = logging.getLogger(__name__)


def parse_model_config(text: str | None) -> dict[str, Any] | None:
    """``--model-config``: a JSON object, a path to a JSON/YAML file, or a preset name."""
    if text is None:
        return None
    text = text.strip()
    if text.startswith("{"):
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise ZipasrError(f"--model-config is not valid JSON: {e}") from e
    path = Path(text)
    if path.is_file():
        import yaml

        d = yaml.safe_load(path.read_text())  # YAML is a superset of JSON
        if not isinstance(d, dict):
            raise ZipasrError(f"--model-config {path}: expected a mapping")
        return d.get("model", d) if "model" in d and isinstance(d["model"], dict) else d
    return {"preset": text}


def load_model(path: str | Path, model_config: dict[str, Any] | None = None,
               vocab_size: int | None = None, device: str | torch.device = "cpu"):
    """A :class:`~zipasr.model.Transducer` in eval mode with the file's weights.

    The file's own ``model_config`` wins over ``model_config``; ``vocab_size`` fills in a
    config that does not fix it (icefall's pretrained.pt with ``--preset``).
    """
    from zipasr.model import Transducer, ZipformerConfig

    ckpt = load_checkpoint(path)
    cfg = ckpt.get("model_config") or model_config
    if ckpt.get("model_config") and model_config:
        log.info("%s carries its own model_config; the one given is not used", path)
    if cfg is None:
        raise ZipasrError(f"{path} has no model_config: give --model-config or --preset "
                          "(e.g. --preset M --vocab-size 500 for icefall's pretrained.pt)")
    cfg = dict(cfg.to_dict() if isinstance(cfg, ZipformerConfig) else cfg)
    if vocab_size is not None and "vocab_size" not in cfg:
        cfg["vocab_size"] = vocab_size
    try:
        model = Transducer.from_config(cfg)
    except (KeyError, ValueError, TypeError) as e:
        raise ZipasrError(f"bad model configuration {cfg}: {e}") from e
    state = strip_ddp_prefix(ckpt["model"])
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ZipasrError(f"{path} does not match the model configuration {cfg}: "
                          f"{str(e).splitlines()[0]} ...") from e
    return model.to(device).eval()
