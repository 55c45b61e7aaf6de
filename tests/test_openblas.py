"""faiss's bundled OpenBLAS is told the core type on AVX-512 CPUs (hbird._openblas)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from hbird._openblas import AVX512_FLAGS, coretype_to_set, cpu_flags

CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
flags\t\t: fpu sse sse2 avx2 avx512f avx512dq avx512bw avx512vl amx_tile
bogomips\t: 4000.00
"""


def test_cpu_flags_are_read_from_cpuinfo_text() -> None:
    flags = cpu_flags(CPUINFO)
    assert {"avx2", "avx512f", "amx_tile"} <= flags and "bogomips" not in flags
    assert cpu_flags("processor\t: 0\n") == frozenset()


def test_skylakex_only_on_avx512_cpus_and_never_over_the_users_choice() -> None:
    assert coretype_to_set({}, cpu_flags(CPUINFO)) == "SkylakeX"
    assert coretype_to_set({}, cpu_flags(CPUINFO) - {"avx512bw"}) is None  # no AVX-512 BW
    assert coretype_to_set({}, frozenset({"sse2", "avx2"})) is None
    assert coretype_to_set({"OPENBLAS_CORETYPE": "Haswell"}, cpu_flags(CPUINFO)) is None


PROBE = """
import ctypes, os
from hbird._optional import require
require("faiss", "test")
libs = sorted({line.split()[-1] for line in open("/proc/self/maps") if "libopenblas" in line})
names = []
for path in libs:
    lib = ctypes.CDLL(path)
    if hasattr(lib, "openblas_get_corename"):
        lib.openblas_get_corename.restype = ctypes.c_char_p
        names.append(lib.openblas_get_corename().decode())
print(",".join(names) or "none", os.environ.get("OPENBLAS_CORETYPE", "unset"))
"""


def _probe(env: dict[str, str]) -> list[str]:
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**env, "PYTHONPATH": os.pathsep.join([src, env.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


@pytest.mark.skipif(
    not AVX512_FLAGS <= cpu_flags() or sys.platform != "linux", reason="needs an AVX-512 CPU"
)
def test_faiss_openblas_runs_skylakex_kernels_and_the_environment_is_restored() -> None:
    pytest.importorskip("faiss")
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_CORETYPE"}
    corenames, variable = _probe(env)
    if corenames == "none":
        pytest.skip("this faiss build does not load an OpenBLAS")
    assert corenames.split(",")[0] == "SkylakeX" and variable == "unset"
    corenames, variable = _probe({**env, "OPENBLAS_CORETYPE": "Haswell"})  # the user's wins
    assert corenames.split(",")[0] == "Haswell" and variable == "Haswell"
