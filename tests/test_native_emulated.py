"""The native kernel's AVX-512 paths, checked on any x86 CPU with AVX2: the native step's tests run again in a
child process whose kernel is built on SIMDe's portable AVX-512 intrinsics (GPT2LAB_NATIVE_EMULATE, gpt2lab.native),
once for each kind of AVX-512 machine the paths distinguish. The oracles are the same tests' (the modules, and
plain-PyTorch references of the int8, int4 and bf16 dot-product arithmetic); on a CPU that has the instructions,
the same tests check the real ones directly.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from gpt2lab import native

pytestmark = [
    pytest.mark.skipif(native.simde_include() is None, reason="SIMDe's headers missing: pip install simde-py"),
    pytest.mark.skipif(not native.buildable(), reason=f"the native kernel cannot be built here: "
                                                      f"{native.unavailable_reason() or 'see gpt2lab.native'}"),
]

MACHINES = {
    "AVX-512 with bf16 and int8 dot products (Zen 4, Sapphire Rapids)": "avx512,avx512_bf16,avx512_vnni",
    "AVX-512 without them (Skylake-SP)": "avx512",
}


@pytest.mark.parametrize("machine", list(MACHINES))
def test_the_native_step_tests_pass_on_the_emulated_avx512_paths(machine, tmp_path):
    package_root = str(Path(native.__file__).parents[1])  # the gpt2lab these tests import, installed or not
    env = {**os.environ, "GPT2LAB_NATIVE_EMULATE": MACHINES[machine],
           "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
    tests = Path(__file__).with_name("test_native_step.py")
    out = subprocess.run([sys.executable, "-m", "pytest", str(tests), "-q", "-p", "no:cacheprovider"],
                         env=env, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert " passed" in out.stdout and "skipped" not in out.stdout, out.stdout[-2000:]  # the kernel was there
