"""keep_freed_memory: the memory a step frees is not faulted in again by the next step."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from dist_train.runtime import host_memory

from .conftest import REPO

# What a CPU training step does to malloc, without the noise of a real step: many blocks of
# activation-like sizes, written, then freed, step after step; the minor page faults of the
# steps after the first are counted. Transparent huge pages are turned off for the process:
# with them the count would depend on the machine's setting.
ALLOCATION_STEPS = """
import ctypes, resource, sys
libc = ctypes.CDLL("libc.so.6")
PR_SET_THP_DISABLE = 41
libc.prctl(PR_SET_THP_DISABLE, 1, 0, 0, 0)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
from dist_train.runtime.host_memory import keep_freed_memory
if sys.argv[1] == "kept":
    assert keep_freed_memory()
sizes = {
    "small": [64 * 1024] * 512 + [4 * 2**20] * 4,  # 48 MiB: 512 blocks of 64 KiB and 4 of 4 MiB
    "large": [96 * 2**20],  # one block above glibc's documented 32 MiB limit of the mmap threshold
}[sys.argv[2]]

def step():
    blocks = [libc.malloc(n) for n in sizes]
    for block, n in zip(blocks, sizes):
        ctypes.memset(block, 1, n)
    for block in reversed(blocks):
        libc.free(block)

step()  # the first step faults its memory in either way
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""

needs_glibc = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc settings")


def minor_faults_over_4_steps(mode: str, sizes: str = "small") -> int:
    env = {k: v for k, v in os.environ.items() if k not in (*host_memory.USER_SETTINGS, "LD_PRELOAD")}
    env["PYTHONPATH"] = str(REPO)
    out = subprocess.run([sys.executable, "-c", ALLOCATION_STEPS, mode, sizes], env=env, capture_output=True,
                         text=True, timeout=120, check=True)
    return int(out.stdout.strip().splitlines()[-1])


@needs_glibc
def test_kept_memory_is_not_faulted_in_again_by_the_next_step():
    default, kept = minor_faults_over_4_steps("default"), minor_faults_over_4_steps("kept")
    # glibc's defaults trim the freed top of the heap at each step's end, so every step faults
    # its 48 MiB in again (4 x 12,288 pages; 48,792 measured); kept, none of it (0 measured).
    assert default > 4 * 12_288 * 0.9, default
    assert kept < 4 * 12_288 * 0.05, kept


def glibc_version() -> tuple[int, ...]:
    return tuple(int(part) for part in platform.libc_ver()[1].split(".")[:2])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc" or glibc_version() < (2, 36),
                    reason="an mmap threshold above 32 MiB: glibc 2.36 accepts it (older ones may not)")
def test_a_block_larger_than_32_mib_is_kept_too():
    # A step's largest blocks pass 32 MiB (timm's resnet18, batch 64 at 28 px: 16,000 pages a
    # step faulted in with a 32 MiB threshold). With glibc's defaults a 96 MiB block is mapped on
    # malloc and unmapped on free, so each step faults it in (4 x 24,576 pages).
    default, kept = minor_faults_over_4_steps("default", "large"), minor_faults_over_4_steps("kept", "large")
    assert default > 4 * 24_576 * 0.9, default
    assert kept < 4 * 24_576 * 0.05, kept


@needs_glibc
def test_a_malloc_setting_of_the_users_wins(monkeypatch):
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "0")
    assert host_memory.keep_freed_memory() is False


def test_nothing_is_set_on_another_c_library(monkeypatch):
    monkeypatch.setattr(platform, "libc_ver", lambda: ("", ""))
    assert host_memory.keep_freed_memory() is False
