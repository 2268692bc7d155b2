"""Building the native CPU kernels: cached by content, atomic, and clear errors when it fails."""

import os

import pytest

from vmc_jax.kernels import cpu_flash


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("VMC_JAX_KERNEL_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_build_is_cached_and_leaves_no_partial_file(cache, monkeypatch):
    library = cpu_flash.build("flash_attention_cpu.cc")
    assert os.path.dirname(library) == str(cache) and os.path.getsize(library) > 0
    assert os.listdir(cache) == [os.path.basename(library)]

    def no_compiler(*args, **kwargs):
        raise AssertionError("compiled again")

    monkeypatch.setattr(cpu_flash.subprocess, "run", no_compiler)
    assert cpu_flash.build("flash_attention_cpu.cc") == library


def test_missing_compiler_is_named(cache, monkeypatch):
    monkeypatch.setenv("CXX", "no-such-compiler")
    with pytest.raises(RuntimeError, match="no C\\+\\+ compiler: 'no-such-compiler' is not on PATH"):
        cpu_flash.build("flash_attention_cpu.cc")


def test_compile_error_names_the_source(cache, tmp_path, monkeypatch):
    (tmp_path / "broken.cc").write_text("this is not C++\n")
    monkeypatch.setattr(cpu_flash, "KERNEL_DIR", str(tmp_path))
    with pytest.raises(RuntimeError, match=f"compiling {tmp_path / 'broken.cc'} failed"):
        cpu_flash.build("broken.cc")
    assert os.listdir(cache) == []  # the partial output was removed


def test_kernels_can_be_switched_off(monkeypatch):
    monkeypatch.setenv("VMC_JAX_CPU_KERNELS", "0")
    assert cpu_flash._register_flash_attention.__wrapped__() == "VMC_JAX_CPU_KERNELS=0"
