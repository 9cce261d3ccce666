"""Keep freed activation buffers in the process on CPU, instead of handing them back to the kernel.

glibc's ``malloc`` serves blocks above a threshold (128 KiB at first, raised as far as 32 MiB as blocks
are freed) with fresh ``mmap`` pages, and returns the top of the heap to the kernel once more than the trim
threshold (128 KiB) is free there. A training step of a recurrent model allocates and frees the same large
activation buffers every step (at H=1024, B=128, T=100 one [B, T, H] float buffer is 52 MiB), so each step
page-faults them in again. That fault work, not arithmetic, bounded UnICORNN's C++ recurrence: at H=1024,
B=128 it trained at 31k tokens/s with the defaults and 73k with both thresholds raised (``seqplat bench``,
2 threads; docs/performance.md).

:func:`reuse_freed_memory` raises both thresholds once per process, so freed blocks go back to malloc's
free lists and the next step reuses them. The cost: the process's resident memory stays at its peak
rather than shrinking between steps, as with PyTorch's caching allocator on GPUs. Set
``SEQPLAT_MALLOC_TUNING=0`` to keep glibc's defaults. Other C libraries (macOS, musl) are left alone.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys
from collections.abc import Callable

log = logging.getLogger("seqplat.cpu_memory")

#: mallopt parameters (glibc's malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
#: 1 GiB: blocks up to this size come from the heap; larger ones are mapped as before
MMAP_THRESHOLD = 1 << 30
TRIM_THRESHOLD = (1 << 31) - 1

_applied: bool | None = None


def reuse_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds (once per process); returns whether they are raised.

    Does nothing, and returns False, when ``SEQPLAT_MALLOC_TUNING=0`` or when the C library is not glibc.
    """
    global _applied
    if _applied is not None:
        return _applied
    if os.environ.get("SEQPLAT_MALLOC_TUNING", "1").strip().lower() in ("0", "false", "no", "off"):
        return False  # not remembered: the variable may be changed later in the process
    _applied = False
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)
        gnu_get_libc_version = libc.gnu_get_libc_version  # glibc only
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    gnu_get_libc_version.restype = ctypes.c_char_p
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    ok = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    if ok:
        log.debug("glibc %s: mmap and trim thresholds raised; freed buffers stay in the process",
                  gnu_get_libc_version().decode())
    else:
        log.debug("glibc refused the malloc thresholds; keeping its defaults")
    _applied = ok
    return ok


def _status_mb(key: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        return None
    return None


def peak_growth_mb(fn: Callable[[], object]) -> float | None:
    """How far the process's resident memory rose above its level before ``fn()``, at its peak, in MiB.

    This sees every buffer ``fn`` touches, whoever holds it (autograd's saved tensors, a hand-written
    backward's own buffers, kernels' workspaces). Free memory that malloc keeps (see
    :func:`reuse_freed_memory`) is handed back first and the kernel's high-water mark is reset
    (``/proc/self/clear_refs``), so memory freed by earlier work is not counted as already there.
    Linux with glibc only; None elsewhere (``fn`` still runs).
    """
    import gc

    gc.collect()
    try:
        ctypes.CDLL(None).malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current resident size
    except (OSError, AttributeError):
        fn()
        return None
    before = _status_mb("VmRSS")
    fn()
    peak = _status_mb("VmHWM")
    return None if before is None or peak is None else max(peak - before, 0.0)
