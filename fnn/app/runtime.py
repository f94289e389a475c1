"""Settings of the host process for XLA:CPU. Each changes the whole process, so an application
chooses it at its start: ``fnn train`` applies the config's ``host_malloc: tuned``, and a
script or notebook calls :func:`tune_host_malloc` itself.

Why: XLA:CPU allocates the temporary buffers of a compiled step with ``malloc`` on every call
and frees them after it. glibc serves blocks above its mmap threshold (at most 32 MiB by
default) with fresh ``mmap`` pages and unmaps them on ``free``, and the arenas of XLA's worker
threads cannot hold larger blocks at all (their heaps are at most 64 MiB). So a step with large
temporaries faults in and zeroes every page of them again on each call: the Transformer LM step
of ``benchmarks/sequence_step.py`` (319 MiB of temporaries) took 81,800 page faults per call,
about a tenth of its time.
"""

from __future__ import annotations

import ctypes

# mallopt parameters of glibc's malloc.h
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8

# Large blocks come from the heap up to this size and freed memory stays in the process for the
# next step (trimming is left to much larger excess); one arena, so that XLA's threads share
# the main heap, which grows without the 64 MiB limit of a thread's own arena.
MMAP_THRESHOLD = 1 << 30
TRIM_THRESHOLD = (1 << 31) - 1  # the largest value mallopt's int takes
ARENA_MAX = 1

_tuned = False


def tune_host_malloc() -> bool:
    """Makes glibc's ``malloc`` keep freed memory for the next step instead of returning large
    blocks to the system: ``mallopt(M_ARENA_MAX, 1)`` (every thread allocates from the main
    heap, which can grow past 64 MiB), ``M_MMAP_THRESHOLD`` 1 GiB and ``M_TRIM_THRESHOLD``
    2 GiB; the same as ``GLIBC_TUNABLES=glibc.malloc.arena_max=1:glibc.malloc.mmap_threshold=
    1073741824:glibc.malloc.trim_threshold=2147483647``. It changes no number a step computes.

    Worth it for steps with large temporaries, and not for small ones:

    - Transformer LM step (319 MiB of temporaries): page faults 81,800 -> 0 per step, 9%
      faster in the benchmark (469 -> 428 ms; 10-25% between separate runs). The process keeps
      the memory of its largest step (peak RSS 0.95 -> 1.2-1.5 GB).
    - Small steps (digits CNN, a few MiB): 10-30% slower, as all threads then share one arena
      and its lock. The LSTM LM step (28 MiB): no difference.

    Call it first thing in a program, before JAX runs anything: a thread keeps the arena of its
    first allocation. Returns ``True`` when the settings are applied (now or by an earlier call)
    and ``False`` where the C library is not glibc (macOS, musl), where nothing is changed.
    """
    global _tuned
    if _tuned:
        return True
    mallopt = _glibc_mallopt()
    if mallopt is None:
        return False
    for param, value in ((_M_ARENA_MAX, ARENA_MAX), (_M_MMAP_THRESHOLD, MMAP_THRESHOLD),
                         (_M_TRIM_THRESHOLD, TRIM_THRESHOLD)):
        if mallopt(param, value) != 1:
            raise OSError(f"tune_host_malloc: glibc's mallopt({param}, {value}) failed")
    _tuned = True
    return True


def _glibc_mallopt():
    """glibc's ``mallopt`` as a ctypes function, or ``None`` where the C library is another."""
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # glibc only: musl also has mallopt, but as a no-op
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return None
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return mallopt
