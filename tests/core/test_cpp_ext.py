"""Building plugins' C++ kernels: cache names, native then portable flags, failures remembered."""

from pathlib import Path

import pytest
from torch.utils import cpp_extension

from seqplat.core import cpp_ext

SOURCE = Path(cpp_ext.__file__).parents[1] / "plugins" / "unicornn" / "unicornn_cpu.cpp"


@pytest.fixture(autouse=True)
def _native_flags_by_default(monkeypatch):
    """These tests pick the flag sets themselves: a suite run under SEQPLAT_PORTABLE_CPP=1 (the check of the
    portable build) would otherwise drop the native ones they expect."""
    monkeypatch.delenv("SEQPLAT_PORTABLE_CPP", raising=False)


def test_cache_names_follow_flags_and_only_native_builds_follow_the_cpu(monkeypatch):
    native = cpp_ext.extension_name("k", SOURCE, cpp_ext.NATIVE_FLAGS)
    portable = cpp_ext.extension_name("k", SOURCE, cpp_ext.PORTABLE_FLAGS)
    assert native != portable and native.startswith("k_")
    monkeypatch.setattr(cpp_ext, "cpu_fingerprint", lambda: "another cpu")
    assert cpp_ext.extension_name("k", SOURCE, cpp_ext.NATIVE_FLAGS) != native  # a shared cache, another machine
    assert cpp_ext.extension_name("k", SOURCE, cpp_ext.PORTABLE_FLAGS) == portable


NATIVE_OMP = (*cpp_ext.NATIVE_FLAGS, "-fopenmp")
PORTABLE_OMP = (*cpp_ext.PORTABLE_FLAGS, "-fopenmp")


def test_an_edit_of_a_shared_header_renames_every_build(monkeypatch, tmp_path):
    (tmp_path / "seqplat_cpu.h").write_text("// one version\n")
    monkeypatch.setattr(cpp_ext, "INCLUDE_DIR", tmp_path)
    before = cpp_ext.extension_name("k", SOURCE, cpp_ext.PORTABLE_FLAGS)
    (tmp_path / "seqplat_cpu.h").write_text("// another version\n")
    assert cpp_ext.extension_name("k", SOURCE, cpp_ext.PORTABLE_FLAGS) != before


def test_resolve_backend_errors_name_the_cell_and_the_fix():
    import torch

    calls = []

    def load(strict=False):
        calls.append(strict)
        return True

    x = torch.zeros(2, 3)
    assert cpp_ext.resolve_backend("python", x, "mycell", load) == "python" and calls == []
    assert cpp_ext.resolve_backend("auto", x, "mycell", load) == "cpp"
    assert cpp_ext.resolve_backend("cpp", x, "mycell", load) == "cpp" and calls == [False, True]
    assert cpp_ext.resolve_backend("auto", x.half(), "mycell", load) == "python"
    with pytest.raises(ValueError, match=r"^mycell: backend 'cpp' runs float32/float64 CPU tensors, got "
                       r"torch.float16 on cpu; use backend 'auto' or 'python'$"):
        cpp_ext.resolve_backend("cpp", x.half(), "mycell", load)


def test_portable_env_skips_the_native_build(monkeypatch):
    monkeypatch.setattr(cpp_ext, "torch_uses_openmp", lambda: True)
    assert cpp_ext.flag_sets() == [NATIVE_OMP, PORTABLE_OMP, cpp_ext.PORTABLE_FLAGS]
    monkeypatch.setenv("SEQPLAT_PORTABLE_CPP", "1")
    assert cpp_ext.flag_sets() == [PORTABLE_OMP, cpp_ext.PORTABLE_FLAGS]


def test_openmp_is_only_asked_for_where_torch_runs_on_it(monkeypatch):
    """A torch without OpenMP (another parallel backend) has no runtime for the kernel's GOMP calls to bind to."""
    monkeypatch.setattr(cpp_ext, "torch_uses_openmp", lambda: False)
    assert cpp_ext.flag_sets() == [cpp_ext.NATIVE_FLAGS, cpp_ext.PORTABLE_FLAGS]


def test_the_built_kernels_run_their_rows_on_torchs_threads():
    """The unicornn kernel is built with -fopenmp where torch has OpenMP, and 1 or 2 threads give the same bits."""
    import torch

    from seqplat.plugins.unicornn import recurrence

    if not recurrence.load_cpp_extension():
        pytest.skip(f"no C++ kernel here: {recurrence.cpp_error()}")
    if cpp_ext.torch_uses_openmp():
        assert "-fopenmp" in recurrence.KERNEL.state["flags"]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 9, 5, generator=g)
    w, d = torch.rand(5, generator=g), torch.rand(5, generator=g) * 0.2
    y0, z0 = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            out, yT, zT = torch.ops.seqplat_unicornn.forward(x, w, d, y0, z0, 0.5)
            *grads, g_v, g_b = torch.ops.seqplat_unicornn.backward(x, w, d, yT, zT, torch.ones_like(x), yT, zT, 0.5)
            assert g_v is None and g_b is None  # no projection input given
            results.append((out, *grads))
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(a, b) for a, b in zip(*results, strict=True))


@pytest.fixture
def fake_load(monkeypatch):
    """cpp_extension.load that records its flags and fails on those listed in ``refuse``."""
    calls: list[tuple[str, ...]] = []
    refuse: list[tuple[str, ...]] = []

    def load(*, extra_cflags, **_):
        calls.append(tuple(extra_cflags))
        if tuple(extra_cflags) in refuse:
            raise RuntimeError("c++: error: unsupported argument 'native' to option '-march='")

    monkeypatch.setattr(cpp_extension, "load", load)
    return calls, refuse


def test_a_refused_native_build_falls_back_to_portable_flags(fake_load, tmp_path, monkeypatch):
    monkeypatch.setattr(cpp_ext, "torch_uses_openmp", lambda: True)
    calls, refuse = fake_load
    refuse.append(NATIVE_OMP)
    state = {"loaded": False, "error": None}
    assert cpp_ext.build_extension(state, SOURCE, "k", "test", tmp_path)
    assert calls == [NATIVE_OMP, PORTABLE_OMP] and state["loaded"] and state["flags"] == PORTABLE_OMP
    assert cpp_ext.build_extension(state, SOURCE, "k", "test", tmp_path) and len(calls) == 2  # loaded once


def test_a_failed_build_is_remembered_and_not_retried(fake_load, tmp_path, monkeypatch):
    monkeypatch.setattr(cpp_ext, "torch_uses_openmp", lambda: True)
    calls, refuse = fake_load
    refuse.extend([NATIVE_OMP, PORTABLE_OMP, cpp_ext.PORTABLE_FLAGS])
    state = {"loaded": False, "error": None}
    assert not cpp_ext.build_extension(state, SOURCE, "k", "test", tmp_path)
    assert "unsupported argument 'native'" in state["error"]
    assert not cpp_ext.build_extension(state, SOURCE, "k", "test", tmp_path) and len(calls) == 3


def test_no_compiler_is_reported_by_name(monkeypatch, tmp_path):
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    state = {"loaded": False, "error": None}
    assert not cpp_ext.build_extension(state, SOURCE, "k", "test", tmp_path)
    assert state["error"] == "no C++ compiler '/nonexistent/c++' on PATH (set CXX to use another)"


def test_load_kernel_warns_once_with_the_fallback_and_raises_the_fix_when_strict(monkeypatch, tmp_path, caplog):
    from seqplat import SeqplatError

    monkeypatch.setenv("CXX", "/nonexistent/c++")
    state = {"loaded": False, "error": None}
    args = (state, SOURCE, "k", "mykernel", tmp_path)
    with caplog.at_level("WARNING", logger="seqplat.core.cpp_ext"):
        assert not cpp_ext.load_kernel(*args, fallback="using the slow loop", fix="install a compiler")
        assert not cpp_ext.load_kernel(*args, fallback="using the slow loop", fix="install a compiler")
    warnings = [r.getMessage() for r in caplog.records]
    assert warnings == ["mykernel: the C++ kernel is unavailable (no C++ compiler '/nonexistent/c++' on PATH (set CXX "
                        "to use another)); using the slow loop"]
    with pytest.raises(SeqplatError, match=r"mykernel: the C\+\+ kernel cannot be built .*; install a compiler$"):
        cpp_ext.load_kernel(*args, fallback="x", fix="install a compiler", strict=True)
