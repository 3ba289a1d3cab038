"""The facts a training run's floating-point results depend on besides config, data and seed.

Recorded in train-summary.json (``numerics``), in every checkpoint and as MLflow tags
(``numerics.*``), so that two runs' numbers can be compared honestly: with equal facts a run is
bit-identical; a different CPU (other ISA flags, so another joiner precision under
``joiner_bf16: auto`` and other oneDNN/MKL kernels), another thread count or another torch
rounds differently and ends a few tenths of WER apart. A resume under other facts than the
checkpoint's is warned about and listed in the summary's ``numerics_changes``.
"""

from __future__ import annotations

import os
import platform
import re
from pathlib import Path
from typing import Any

import torch

# The CPU features that change which kernels oneDNN, MKL and ATen run (and so the rounding), or
# whether bf16 is native (joiner_bf16: auto follows avx512_bf16 / AMX).
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")

# Environment variables that select kernels, ISA levels or thread counts; recorded when set.
ENV_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "MKL_CBWR", "MKL_ENABLE_INSTRUCTIONS",
            "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "ONEDNN_DEFAULT_FPMATH_MODE",
            "ATEN_CPU_CAPABILITY", "CUBLAS_WORKSPACE_CONFIG")


def cpu_info(cpuinfo: Path = Path("/proc/cpuinfo")) -> dict[str, Any]:
    """Model name, vendor and :data:`ISA_FLAGS` of the first processor in ``cpuinfo`` (Linux);
    elsewhere what :mod:`platform` knows and no flags."""
    fields: dict[str, str] = {}
    try:
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if not line.strip():
                break  # the first processor's block: all cores of a machine kind are alike
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    # x86 says "flags", ARM "Features"
    flags = set((fields.get("flags") or fields.get("Features") or "").split())
    return {"model": fields.get("model name") or platform.processor() or platform.machine(),
            "vendor": fields.get("vendor_id") or fields.get("CPU implementer") or "unknown",
            "flags": {f: f in flags for f in ISA_FLAGS}}


def library_versions() -> dict[str, str]:
    """MKL and oneDNN versions as torch was built with them (from ``torch.__config__.show()``,
    a string torch keeps: no library is loaded for this)."""
    show = torch.__config__.show()
    out = {}
    for name, pattern in (("mkl", r"Math Kernel Library Version (\S+)"),
                          ("onednn", r"MKL-DNN v(\S+)")):
        m = re.search(pattern, show)
        out[name] = m.group(1) if m else "none"
    return out


def numerics_facts(device: torch.device, *, precision: str, joiner_bf16: bool,
                   joiner_bf16_setting: Any, native_bf16: bool,
                   world_size: int) -> dict[str, Any]:
    """The facts for a run on ``device`` with the trainer's resolved precision settings."""
    facts: dict[str, Any] = {
        "cpu": {**cpu_info(), "torch_capability": torch.backends.cpu.get_cpu_capability()},
        "device": device.type,  # not its index: every rank's GPU is of one kind
        "native_bf16": native_bf16,
        "precision": precision,  # autocast: fp32 (off), bf16 or fp16
        "joiner_bf16": joiner_bf16,  # resolved: what ran, not the setting
        "joiner_bf16_setting": str(joiner_bf16_setting),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        # per process; a reduction's order (and so its rounding) depends on the thread count
        "threads": {"torch": torch.get_num_threads(), "world_size": world_size},
        "torch": torch.__version__,
        **library_versions(),
        "env": {k: os.environ[k] for k in ENV_VARS if k in os.environ},
    }
    if device.type == "cuda":
        facts["cuda"] = {
            "name": torch.cuda.get_device_name(device),
            "capability": ".".join(map(str, torch.cuda.get_device_capability(device))),
            "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
            "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
            "tf32_cudnn": torch.backends.cudnn.allow_tf32,
            "cudnn_benchmark": torch.backends.cudnn.benchmark,
            "cudnn_deterministic": torch.backends.cudnn.deterministic,
        }
    return facts


def flat(facts: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"cpu.flags.avx2": True, ...}``: nested facts as one level, for comparing two records."""
    out: dict[str, Any] = {}
    for k, v in facts.items():
        if isinstance(v, dict):
            out.update(flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def differences(before: dict[str, Any] | None, after: dict[str, Any]) -> dict[str, list[Any]]:
    """``{fact: [before, after]}`` for the facts that changed (nothing when ``before`` is
    unknown: a checkpoint written before these facts were recorded)."""
    if not before:
        return {}
    a, b = flat(before), flat(after)
    return {k: [a.get(k), b.get(k)] for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)}
