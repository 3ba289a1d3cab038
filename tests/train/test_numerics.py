"""The numerics facts (zipasr.train.numerics) agree with /proc/cpuinfo and torch on this machine;
the cpuinfo parser reads other machines' layouts; differences name what changed."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from zipasr.train.numerics import ISA_FLAGS, cpu_info, differences, numerics_facts

PROC = Path("/proc/cpuinfo")


def _proc_field(name: str) -> str:
    """The first ``name : value`` of /proc/cpuinfo, read independently of the parser."""
    m = re.search(rf"^{re.escape(name)}\s*:\s*(.*)$", PROC.read_text(), re.MULTILINE)
    assert m, name
    return m.group(1).strip()


@pytest.mark.skipif(not PROC.is_file() or "flags" not in PROC.read_text(),
                    reason="needs an x86 Linux /proc/cpuinfo")
def test_facts_match_this_machine() -> None:
    f = numerics_facts(torch.device("cpu"), precision="fp32", joiner_bf16=True,
                       joiner_bf16_setting="auto", native_bf16=True, world_size=1)
    cpu = f["cpu"]
    assert cpu["model"] == _proc_field("model name")
    assert cpu["vendor"] == _proc_field("vendor_id")
    flags = set(_proc_field("flags").split())
    assert cpu["flags"] == {name: name in flags for name in ISA_FLAGS}
    assert cpu["torch_capability"] == torch.backends.cpu.get_cpu_capability()
    # torch only builds AVX512 kernels in when it may run them
    if cpu["torch_capability"] == "AVX512":
        assert cpu["flags"]["avx512f"]
    assert f["threads"] == {"torch": torch.get_num_threads(), "world_size": 1}
    assert f["torch"] == torch.__version__ and f["device"] == "cpu" and "cuda" not in f
    assert (f["joiner_bf16"], f["joiner_bf16_setting"], f["precision"]) == (True, "auto", "fp32")
    show = torch.__config__.show()
    for lib, available in (("mkl", torch.backends.mkl.is_available()),
                           ("onednn", torch.backends.mkldnn.is_available())):
        if available:
            assert f[lib] != "none" and f[lib] in show, lib


def test_env_overrides_are_recorded(monkeypatch) -> None:
    monkeypatch.setenv("MKL_CBWR", "AVX2")
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    f = numerics_facts(torch.device("cpu"), precision="bf16", joiner_bf16=False,
                       joiner_bf16_setting=False, native_bf16=False, world_size=2)
    assert f["env"]["MKL_CBWR"] == "AVX2" and "ONEDNN_MAX_CPU_ISA" not in f["env"]
    assert f["threads"]["world_size"] == 2 and f["joiner_bf16_setting"] == "False"


def test_cpuinfo_layouts(tmp_path: Path) -> None:
    intel = tmp_path / "intel"
    intel.write_text(
        "processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R) Gold 6148\n"
        "flags\t\t: fpu sse2 avx avx2 fma avx512f avx512bw\n\n"
        "processor\t: 1\nvendor_id\t: Other\nflags\t\t: amx_tile\n")
    got = cpu_info(intel)
    assert got["model"] == "Intel(R) Xeon(R) Gold 6148" and got["vendor"] == "GenuineIntel"
    # the first processor's flags only; avx512bw does not count as avx512_bf16
    assert [k for k, v in got["flags"].items() if v] == ["avx2", "fma", "avx512f"]
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd bf16 sve\nCPU implementer\t: 0x41\n")
    got = cpu_info(arm)
    assert got["vendor"] == "0x41" and not any(got["flags"].values()) and got["model"]
    assert cpu_info(tmp_path / "absent")["vendor"] == "unknown"


def test_differences() -> None:
    a = {"cpu": {"model": "A", "flags": {"avx512_bf16": True}}, "threads": {"torch": 2}}
    b = {"cpu": {"model": "B", "flags": {"avx512_bf16": False}}, "threads": {"torch": 2},
         "env": {"MKL_CBWR": "AVX2"}}
    assert differences(a, a) == {}
    assert differences(None, a) == {}  # a checkpoint from before the facts were recorded
    assert differences(a, b) == {"cpu.flags.avx512_bf16": [True, False],
                                 "cpu.model": ["A", "B"], "env.MKL_CBWR": [None, "AVX2"]}
