"""``fnn.app.runtime.tune_host_malloc``: after it, a freed large block is reused without faulting
its pages in again. Each case runs in a subprocess, since the settings are the whole process's."""

import json
import subprocess
import sys

import pytest

from fnn.app.runtime import _glibc_mallopt

BLOCK_MIB = 64  # above glibc's largest default mmap threshold (32 MiB)
PAGES = BLOCK_MIB * 256  # 4 KiB pages

SCRIPT = f"""
import ctypes, json, resource, sys
from fnn.app.runtime import tune_host_malloc
if sys.argv[1] == "tuned":
    assert tune_host_malloc() is True and tune_host_malloc() is True  # idempotent
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
faults = []
for _ in range(3):  # allocate, touch every page, free
    block = libc.malloc({BLOCK_MIB} << 20)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    ctypes.memset(block, 1, {BLOCK_MIB} << 20)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    libc.free(block)
print(json.dumps(faults))
"""


def _faults(mode: str) -> list[int]:
    result = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.splitlines()[-1])


@pytest.mark.skipif(_glibc_mallopt() is None, reason="the C library is not glibc")
def test_a_freed_large_block_is_reused_without_page_faults_after_tuning():
    default, tuned = _faults("default"), _faults("tuned")
    # glibc's default: every block is a fresh mmap, all of its pages fault in every time
    assert all(f >= 0.9 * PAGES for f in default), default
    # tuned: the first block grows the heap (its pages fault in once), the next ones reuse it
    assert tuned[0] >= 0.9 * PAGES, tuned
    assert all(f < 0.01 * PAGES for f in tuned[1:]), tuned
