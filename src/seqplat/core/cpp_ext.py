"""Build a plugin's C++ CPU kernel at first use, cached, tuned to the machine it runs on.

Plugins with a C++ kernel (``unicornn``'s recurrence, the ``lstm`` cell's own loop) compile it with
``torch.utils.cpp_extension`` the first time it is needed. The build lives in ``$SEQPLAT_EXT_CACHE``
or ``$SEQPLAT_CACHE/ext`` (default ``~/.cache/seqplat/ext``) in a folder named after the source, the
torch version, the flags and the CPU, so an edit, a torch upgrade or another machine sharing the
cache (an NFS home on a cluster) gets its own build.

The kernels' inner loops carry ``#pragma omp simd`` and call ``std::tanh``/``std::exp``; with
``-ffast-math`` glibc (>= 2.35) supplies vector versions of those, and ``-march=native`` lets the
compiler use the widest vectors the CPU has (AVX2: 8 floats instead of SSE's 4), which measured
1.4-1.8x faster for the UnICORNN kernel. Where the compiler refuses ``-march=native`` the portable
flags are tried next; ``SEQPLAT_PORTABLE_CPP=1`` skips the native build.

``at::parallel_for`` is a header template: its ``#pragma omp parallel`` is compiled into the kernel,
and without ``-fopenmp`` the compiler drops it and every batch row runs on one thread (the kernels
took the same time on 1 and 2 threads). Where torch itself runs on OpenMP the kernels are compiled
with ``-fopenmp`` but not linked with it: the ``GOMP_*`` calls resolve, when the kernel is loaded, to
the OpenMP runtime torch has already loaded, so the process keeps one runtime and one thread pool
(``torch.set_num_threads`` applies). A build that fails with it is retried without.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

log = logging.getLogger(__name__)

#: headers every kernel may include (``seqplat_cpu.h``); on the include path and in every build's hash
INCLUDE_DIR = Path(__file__).with_name("include")

#: compile flags only (never link flags: -ffast-math at link time would set flush-to-zero process-wide)
PORTABLE_FLAGS: tuple[str, ...] = ("-O3", "-ffast-math", "-fopenmp-simd")
NATIVE_FLAGS: tuple[str, ...] = (*PORTABLE_FLAGS, "-march=native")
#: compile flag that keeps at::parallel_for's threads (compile only, see the module docstring)
THREAD_FLAGS: tuple[str, ...] = ("-fopenmp",)


def extension_cache_dir() -> Path:
    """Where C++ kernels are built: ``$SEQPLAT_EXT_CACHE`` if set, else ``$SEQPLAT_CACHE/ext`` or
    ``~/.cache/seqplat/ext``."""
    own = os.environ.get("SEQPLAT_EXT_CACHE")
    if own:
        return Path(own).expanduser()
    root = os.environ.get("SEQPLAT_CACHE")
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "seqplat"
    return base / "ext"


def cpu_fingerprint() -> str:
    """The CPU's model name and feature flags (Linux), else the platform's processor string."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    keep = [line for line in text.splitlines() if line.startswith(("model name", "flags", "Features"))]
    return "\n".join(sorted(set(keep))) or f"{platform.machine()} {platform.processor()}"


def torch_uses_openmp() -> bool:
    """Whether torch's parallel backend is OpenMP (then kernels can share its runtime)."""
    import torch

    return bool(torch.backends.openmp.is_available())


def flag_sets() -> list[tuple[str, ...]]:
    """The flags to try, best first: native then portable, threaded where torch runs OpenMP, then plain portable."""
    bases = [PORTABLE_FLAGS]
    if os.environ.get("SEQPLAT_PORTABLE_CPP", "") in ("", "0"):
        bases.insert(0, NATIVE_FLAGS)
    if not torch_uses_openmp():
        return bases
    return [*((*base, *THREAD_FLAGS) for base in bases), PORTABLE_FLAGS]


def extension_name(prefix: str, source: Path, flags: tuple[str, ...]) -> str:
    """``<prefix>_<hash>``: the hash covers the source, the shared headers, torch's version, the flags and (for
    native builds) the CPU."""
    import torch

    key = source.read_bytes() + torch.__version__.encode() + " ".join(flags).encode()
    for header in sorted(INCLUDE_DIR.glob("*.h")):
        key += header.read_bytes()
    if "-march=native" in flags:
        key += cpu_fingerprint().encode()
    return f"{prefix}_{hashlib.sha256(key).hexdigest()[:12]}"


def load_kernel(state: dict[str, Any], source: Path, prefix: str, label: str, cache_dir: Path | None = None, *,
                fallback: str, fix: str, strict: bool = False) -> bool:
    """:func:`build_extension`, with the plugin's messages: True when the kernel is usable.

    The first failure is logged once as a warning ending in ``fallback`` (what runs instead); with
    ``strict`` a failure raises :class:`~seqplat.SeqplatError` ending in ``fix`` (what the user can do).
    """
    first = not state["loaded"] and state["error"] is None
    if build_extension(state, source, prefix, label, cache_dir):
        return True
    if first:
        log.warning("%s: the C++ kernel is unavailable (%s); %s", label, state["error"], fallback)
    if strict:
        from seqplat.core.errors import SeqplatError

        raise SeqplatError(f"{label}: the C++ kernel cannot be built ({state['error']}); {fix}")
    return False


def resolve_backend(backend: str, x: Any, label: str, load: Callable[..., bool]) -> Literal["cpp", "python"]:
    """The loop a cell runs for ``x``: ``"cpp"`` (float32/float64 CPU tensors, kernel built) or ``"python"``.

    ``backend`` is the cell's option: ``"python"`` always, ``"cpp"`` or a clear error (another dtype or
    device: ``ValueError``; no kernel: ``load(strict=True)`` raises), ``"auto"`` whichever runs.
    ``load`` is the plugin's ``load_cpp_extension``.
    """
    import torch

    cpp_ok = x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64)
    if backend == "python":
        return "python"
    if backend == "cpp":
        if not cpp_ok:
            raise ValueError(f"{label}: backend 'cpp' runs float32/float64 CPU tensors, got {x.dtype} on {x.device}; "
                             "use backend 'auto' or 'python'")
        load(strict=True)
        return "cpp"
    return "cpp" if cpp_ok and load() else "python"


class CppKernel:
    """One plugin's C++ kernel: built at first use (cached, tuned to this CPU), its failure remembered.

    ``label`` names it in messages, ``fallback`` says what runs without it (logged once) and ``fix``
    what the user can do (the end of the error with ``strict``); both default to those of a cell with a
    ``cell.backend`` option. A plugin keeps one per source file and
    exposes :meth:`load`, :meth:`error` and :meth:`resolve`; ``state`` is ``{"loaded", "error", "flags"}``.
    """

    #: the messages of a cell whose ``cell.backend`` option picks the kernel or its PyTorch loop
    LOOP_FALLBACK = "using the PyTorch loop"
    LOOP_FIX = "cell.backend='cpp' needs it: install a C++ compiler and ninja, or set cell.backend=auto or python"

    def __init__(self, source: Path, prefix: str, label: str, *, fallback: str = LOOP_FALLBACK,
                 fix: str = LOOP_FIX):
        self.source, self.prefix, self.label = source, prefix, label
        self.fallback, self.fix = fallback, fix
        self.state: dict[str, Any] = {"loaded": False, "error": None}

    def load(self, strict: bool = False, cache_dir: Path | None = None) -> bool:
        """Compile (first use only, 15-60 s) and load the kernel; True when it is usable.

        ``cache_dir`` overrides the cache folder. A failure (no compiler, no ninja, a compile error)
        is remembered and logged once; with ``strict`` it raises :class:`~seqplat.SeqplatError`.
        """
        return load_kernel(self.state, self.source, self.prefix, self.label, cache_dir, strict=strict,
                           fallback=self.fallback, fix=self.fix)

    def error(self) -> str | None:
        """Why the kernel is unavailable (None if it loaded or was never tried)."""
        return self.state["error"]

    def resolve(self, backend: str, x: Any) -> Literal["cpp", "python"]:
        """:func:`resolve_backend` with this kernel."""
        return resolve_backend(backend, x, self.label, self.load)


def build_extension(state: dict[str, Any], source: Path, prefix: str, label: str,
                    cache_dir: Path | None = None) -> bool:
    """Compile (first use only) and load ``source`` as a torch op library; True when it is loaded.

    ``state`` is the caller's ``{"loaded": bool, "error": str | None}``: a failure (no compiler, no
    ninja, a compile error) is recorded there and later calls return False at once. ``label`` names
    the kernel in log lines.
    """
    if state["loaded"]:
        return True
    if state["error"] is not None:
        return False
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        state["error"] = f"no C++ compiler '{compiler}' on PATH (set CXX to use another)"
        return False
    from torch.utils import cpp_extension

    for flags in flag_sets():
        name = extension_name(prefix, source, flags)
        build = (cache_dir or extension_cache_dir()) / name
        try:
            build.mkdir(parents=True, exist_ok=True)
            log.info("%s: building the C++ kernel in %s (first use only)", label, build)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                cpp_extension.load(name=name, sources=[str(source)], build_directory=str(build),
                                   extra_cflags=list(flags), extra_include_paths=[str(INCLUDE_DIR)],
                                   is_python_module=False, verbose=False)
            state["loaded"] = True
            state["flags"] = flags
            return True
        except Exception as exc:  # noqa: BLE001 - compile or load failure: next flags, then the caller's fallback
            msg = str(exc).strip()
            state["error"] = f"{type(exc).__name__}: {msg.splitlines()[-1] if msg else ''}"
            if flags != PORTABLE_FLAGS:
                log.info("%s: the build with %s failed (%s); trying the next flags", label, " ".join(flags),
                         state["error"])
    return False
