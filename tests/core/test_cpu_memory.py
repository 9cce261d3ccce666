"""The malloc thresholds that keep freed activation buffers in the process (seqplat.core.cpu_memory)."""

import json
import os
import subprocess
import sys

import pytest
import torch

from seqplat.core.cpu_memory import peak_growth_mb, reuse_freed_memory

# allocate, touch and free a 64 MiB tensor again and again, as a training step does with its activations. The
# first few rounds are not counted: with the thresholds raised, one or two of them still grew the heap (a
# full 16,384 faults each, in about one run in three), after which every round reused the block
PROBE = """
import json, resource
import torch
from seqplat.core.cpu_memory import reuse_freed_memory
applied = reuse_freed_memory()
faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
    x = torch.ones(16 << 20); del x
before = faults()
for _ in range(8):
    x = torch.ones(16 << 20); del x
print(json.dumps({"applied": applied, "faults_per_alloc": (faults() - before) / 8}))
"""


def probe(tuning: str) -> dict:
    env = {**os.environ, "SEQPLAT_MALLOC_TUNING": tuning}
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc tuning is Linux-only")
def test_freed_buffers_are_reused_instead_of_faulted_in_again():
    off, on = probe("0"), probe("1")
    assert off["applied"] is False
    if not on["applied"]:
        pytest.skip("this C library is not glibc")
    # glibc's defaults map a fresh 64 MiB (16,384 pages) for every allocation; raised, it reuses the block
    assert off["faults_per_alloc"] > 10_000
    assert on["faults_per_alloc"] < 0.25 * off["faults_per_alloc"]


class _KeepsOnContext(torch.autograd.Function):
    """A hand-written backward that keeps a 64 MiB buffer on its context, out of autograd's sight."""

    @staticmethod
    def forward(ctx, x):
        ctx.buffer = torch.ones(16 << 20)
        return x * 2

    @staticmethod
    def backward(ctx, g):
        return g * ctx.buffer[0]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/status is Linux-only")
def test_peak_growth_sees_buffers_whoever_holds_them():
    reuse_freed_memory()
    x = torch.ones(16 << 20)  # 64 MiB made and freed first: the measurement must not count it as already there
    del x
    growth = peak_growth_mb(lambda: _KeepsOnContext.apply(torch.ones(4, requires_grad=True)).sum().backward())
    if growth is None:
        pytest.skip("no /proc/self/clear_refs here")
    assert 56 < growth < 100  # the 64 MiB buffer, whatever else a backward touches is small
    assert peak_growth_mb(lambda: torch.ones(4).sum()) < 8
