"""fedlpt.allocator: freed memory stays in the process while training, and goes back after.

The page-fault and RSS checks run in fresh interpreters: the setting is per process,
and the first call decides it.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import textwrap

import pytest
import torch

from fedlpt import allocator
from fedlpt.models import ConvNet
from fedlpt.quant.training import LowPrecision
from fedlpt.task import LocalTrainer

glibc = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")

# A training step's pattern: the same three 20 MB tensors made and freed every round.
_ROUNDS = """
import resource, torch
from fedlpt import allocator
assert allocator.hold_freed_memory()
def rounds(n):
    for _ in range(n):
        blocks = [torch.empty(5_000_000).fill_(1.0) for _ in range(3)]
        del blocks
rounds(10)  # glibc settles its heap in the first rounds
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
rounds(5)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""

# Bytes glibc serves from mmap (fresh kernel pages, page-faulted in on first touch and
# given back on free) while one 20 MB tensor lives.
_MMAPPED = """
import ctypes, sys, torch
from fedlpt import allocator
class Info(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
        "uordblks", "fordblks", "keepcost")]
mallinfo2 = ctypes.CDLL(None).mallinfo2
mallinfo2.restype = Info
if sys.argv[1] == "hold":
    assert allocator.hold_freed_memory()
before = mallinfo2().hblkhd
block = torch.empty(5_000_000)
print(mallinfo2().hblkhd - before)
"""

_RELEASE = """
import torch
from fedlpt import allocator
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096
assert allocator.hold_freed_memory()
blocks = [torch.empty(5_000_000).fill_(1.0) for _ in range(3)]
del blocks
kept = rss()
allocator.release_freed_memory()
print(kept - rss())
"""


def _python(code: str, *args: str, **env: str) -> str:
    clean = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("MALLOC_") and k not in ("GLIBC_TUNABLES", "FEDLPT_HOLD_MEMORY")
    }
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return out.stdout.split("\n")[-2]


@glibc
def test_held_memory_is_not_page_faulted_again():
    # Without holding, these rounds fault 10,000-15,000 times each, or not at all,
    # depending on where the heap lies in the address space (seen run to run).
    assert int(_python(_ROUNDS)) < 1_000


@glibc
def test_blocks_up_to_32_mib_come_from_the_heap():
    assert int(_python(_MMAPPED, "default")) >= 20_000_000
    assert int(_python(_MMAPPED, "hold")) == 0


@glibc
def test_release_hands_freed_memory_back():
    assert int(_python(_RELEASE)) > 40e6


@pytest.mark.parametrize(
    "name, value",
    [
        ("FEDLPT_HOLD_MEMORY", "0"),
        ("FEDLPT_HOLD_MEMORY", "off"),
        ("MALLOC_TRIM_THRESHOLD_", "131072"),
        ("MALLOC_MMAP_THRESHOLD_", "131072"),
        ("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=131072"),
    ],
)
def test_the_users_malloc_settings_win(monkeypatch, name, value):
    monkeypatch.setattr(allocator, "_held", None)
    monkeypatch.setenv(name, value)
    assert allocator.hold_freed_memory() is False
    monkeypatch.delenv(name)
    assert allocator.hold_freed_memory() is False  # the first call decided
    allocator.release_freed_memory()  # nothing held: nothing to do


def test_other_glibc_tunables_do_not_count(monkeypatch):
    monkeypatch.setattr(allocator, "_held", None)
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.pthread.rseq=0")
    assert allocator._user_chose() is None


@glibc
def test_a_cpu_trainer_holds_memory(monkeypatch):
    monkeypatch.setattr(allocator, "_held", None)
    torch.manual_seed(0)
    with LocalTrainer(ConvNet(1, 10, 8, width=8, depth=1), LowPrecision.uniform(8)) as trainer:
        assert allocator._held is True
        trainer.step(torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 3]))
