"""Build every C++ kernel of seqplat's own plugins into the kernel cache: ``python -m seqplat.testing.prebuild``.

The test suite starts this in a background process (see ``tests/conftest.py``) so the kernels compile on
the second core while the first runs tests: ten builds of 5-40 s each, otherwise done one after the
other inside the tests that first need them. A test that needs a kernel still being built waits for
torch's build lock and then loads the finished build. Kernels already in the cache load in milliseconds.
"""

from __future__ import annotations

import importlib
import sys

#: modules holding a ``KERNEL`` (:class:`seqplat.core.cpp_ext.CppKernel`), roughly in the order the tests need them
KERNEL_MODULES: tuple[str, ...] = (
    "seqplat.core.gemm",
    "seqplat.plugins.gam_rhn.fused",
    "seqplat.plugins.baselines.own_lstm",
    "seqplat.plugins.rhn.fused",
    "seqplat.plugins.fs_rnn.fused",
    "seqplat.plugins.phased_lstm.scan",
    "seqplat.plugins.sab.fused",
    "seqplat.plugins.unicornn.recurrence",
    "seqplat.plugins.unicornn.cornn_fused",
    "seqplat.plugins.baselines.own_gru",
)


def main() -> int:
    failed = []
    for name in KERNEL_MODULES:
        kernel = importlib.import_module(name).KERNEL
        if not kernel.load():
            failed.append(f"{name}: {kernel.error()}")
    for line in failed:
        print(f"prebuild: {line}", file=sys.stderr)
    return 0  # a kernel that cannot be built is the tests' to report (they check the fallback)


if __name__ == "__main__":
    sys.exit(main())
