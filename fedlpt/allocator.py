"""Keep freed memory in the process while a CPU training run lasts (glibc's malloc only).

A training step allocates and frees the same tensors every step: activations, the
errors flowing back, their rounded copies (16.8 MB each for the first layer of the
paper's ConvNet at batch 32 on 28x28 images). glibc's malloc serves a block above its
mmap threshold with fresh pages from the kernel and gives freed memory at the top of its
heap back once more than its trim threshold lies free there. Both thresholds adapt to
what the program frees, but not to a pattern like a training step's: measured on that
ConvNet (8-bit, one thread), a step page-faulted about 22,000 times, 88 MB of zeroed
pages and 30 ms of kernel time in a 200 ms step, every step; FP32 steps now and then did
too. PyTorch's CPU tuning guide points at the same cost (and at jemalloc or tcmalloc,
which need ``LD_PRELOAD``).

:func:`hold_freed_memory` fixes the two thresholds instead: blocks up to 32 MiB (the
most glibc accepts) come from the heap, and freed memory stays in the process. The
process then keeps its peak, so :func:`release_freed_memory` hands the free part back
when a training run ends (a client between rounds holds only what it uses).

Elsewhere (musl, macOS, Windows, an allocator preloaded in glibc's place) both are no-ops;
``FEDLPT_HOLD_MEMORY=0`` turns them off, and so does setting glibc's own malloc
variables (``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``, ``GLIBC_TUNABLES``
with ``glibc.malloc``): the user's choice wins.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
from typing import Any

_LOG = logging.getLogger(__name__)
M_TRIM_THRESHOLD = -1  # mallopt parameters, from glibc's malloc.h
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # the largest M_MMAP_THRESHOLD glibc accepts on 64-bit
# mallopt takes an int: the largest (2 GiB) keeps what a training run frees; the run's
# end trims (release_freed_memory).
TRIM_THRESHOLD = 2**31 - 1
_USER_VARIABLES = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")

_lock = threading.Lock()
_held: bool | None = None  # None: not tried yet in this process


def _glibc() -> Any | None:
    """The C library when it is glibc and its malloc is the one in use, else None."""
    try:
        libc = ctypes.CDLL(None)
        version = libc.gnu_get_libc_version
        mallopt, malloc_trim = libc.mallopt, libc.malloc_trim
    except (OSError, AttributeError):
        return None
    version.restype = ctypes.c_char_p
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    malloc_trim.argtypes = (ctypes.c_size_t,)
    return libc


def _user_chose() -> str | None:
    """The variable by which the user turned this off or tuned malloc, if any."""
    if os.environ.get("FEDLPT_HOLD_MEMORY", "1").strip() in ("0", "false", "no", "off"):
        return "FEDLPT_HOLD_MEMORY"
    for name in _USER_VARIABLES:
        if name in os.environ:
            return name
    if "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        return "GLIBC_TUNABLES"
    return None


def hold_freed_memory() -> bool:
    """Keep freed memory in this process from now on; True where it applies.

    Idempotent and thread-safe; the first call decides for the whole process.
    """
    global _held
    with _lock:
        if _held is not None:
            return _held
        _held = False
        libc = _glibc()
        if libc is None:
            return False
        reason = _user_chose()
        if reason is not None:
            _LOG.debug("fedlpt: malloc left as configured (%s is set)", reason)
            return False
        # Setting either threshold stops glibc adapting both: set the trim one first,
        # which glibc always accepts.
        trimmed = libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
        _held = bool(trimmed) and bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))
        if not _held:
            _LOG.warning("fedlpt: glibc refused the malloc thresholds; training may page-fault")
        return _held


def is_held() -> bool:
    """Whether this process holds freed memory (:func:`hold_freed_memory` took effect)."""
    return bool(_held)


def release_freed_memory() -> None:
    """Give the free memory at the top of the heap back to the kernel (where held)."""
    if _held:
        libc = _glibc()
        if libc is not None:
            libc.malloc_trim(0)
