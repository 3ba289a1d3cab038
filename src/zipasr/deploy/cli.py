"""Subcommands ``transcribe`` and ``export-onnx``: what a user does with a trained model.

Registration is argparse only; the handlers import torch, onnx and the rest lazily.
"""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    _register_transcribe(sub)
    _register_export_onnx(sub)


# -- transcribe ---------------------------------------------------------------------------


def _register_transcribe(sub: argparse._SubParsersAction) -> None:
    pass


# -- export-onnx --------------------------------------------------------------------------


def _register_export_onnx(sub: argparse._SubParsersAction) -> None:
    pass
