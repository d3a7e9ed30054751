"""The llama.cpp runtime guard: AMX CPUs get no extra buffer types, and a native crash in a
probe child becomes an error that names the cause and the fix.

On Xeons with AMX a native llama.cpp build puts weights into its AMX buffer type and the
first decode segfaults (ggml-org/llama.cpp#20824). These tests pin the decision rule with a
fake /proc/cpuinfo, check that the rule really reaches llama_model_params, and run a real
child that dies of SIGSEGV through the probe.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from crecli.errors import BackendError
from crecli.models import llama, runtime

AMX_FLAGS = "flags\t\t: fpu vme sse sse2 avx avx2 avx512f avx512_vnni amx_bf16 amx_tile amx_int8\n"
PLAIN_FLAGS = "flags\t\t: fpu vme sse sse2 avx avx2 fma f16c\n"


@pytest.fixture
def cpuinfo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    def write(flags_line: str) -> None:
        path = tmp_path / "cpuinfo"
        path.write_text("processor\t: 0\nmodel name\t: Test CPU\n" + flags_line)
        monkeypatch.setattr(runtime, "CPUINFO", str(path))
        runtime.cpu_has_amx.cache_clear()

    monkeypatch.delenv("CRE_LLAMA_EXTRA_BUFTS", raising=False)
    yield write
    runtime.cpu_has_amx.cache_clear()


def test_amx_cpu_turns_extra_buffer_types_off(cpuinfo) -> None:
    cpuinfo(AMX_FLAGS)
    assert runtime.cpu_has_amx() and not runtime.use_extra_bufts()


def test_cpu_without_amx_keeps_repacked_weights(cpuinfo) -> None:
    cpuinfo(PLAIN_FLAGS)
    assert not runtime.cpu_has_amx() and runtime.use_extra_bufts()


def test_unreadable_cpuinfo_counts_as_no_amx(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runtime, "CPUINFO", str(tmp_path / "missing"))
    runtime.cpu_has_amx.cache_clear()
    try:
        assert not runtime.cpu_has_amx()
    finally:
        runtime.cpu_has_amx.cache_clear()


@pytest.mark.parametrize("value, expected", [("0", False), ("off", False), ("1", True), ("yes", True)])
def test_environment_overrides_the_choice(cpuinfo, monkeypatch: pytest.MonkeyPatch, value: str, expected: bool) -> None:
    cpuinfo(AMX_FLAGS if expected else PLAIN_FLAGS)  # the override wins over the CPU either way
    monkeypatch.setenv("CRE_LLAMA_EXTRA_BUFTS", value)
    assert runtime.use_extra_bufts() is expected


def test_the_choice_reaches_llama_model_params() -> None:
    """What `Llama(...)` builds inside the guard has use_extra_bufts off, and only there."""
    low = pytest.importorskip("llama_cpp.llama_cpp")
    assert low.llama_model_default_params().use_extra_bufts  # llama.cpp's default
    with runtime.model_params(extra_bufts=False):
        assert low.llama_model_default_params().use_extra_bufts is False
    assert low.llama_model_default_params().use_extra_bufts
    with runtime.model_params(extra_bufts=True):
        assert low.llama_model_default_params().use_extra_bufts


def test_a_native_crash_in_the_probe_names_cause_and_fix(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from crecli.config import ModelSpec

    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF" + b"\0" * 60)
    spec = ModelSpec(name="m", path=str(gguf))
    monkeypatch.setattr(llama, "require_file", lambda s: gguf)
    # A real child process that dies of SIGSEGV, as llama.cpp does on the first decode.
    monkeypatch.setattr(
        llama, "_probe_command",
        lambda path, s: [sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)"],
    )
    with pytest.raises(BackendError) as info:
        llama.probe(spec)
    message = str(info.value)
    assert "SIGSEGV" in message and "AMX" in message and "GGML_NATIVE=OFF" in message and "'m'" in message
    assert "CRE_LLAMA_EXTRA_BUFTS=0" in message and "--no-deps" in message  # AMX hidden; keep the pinned deps


def test_a_failing_probe_reports_the_last_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from crecli.config import ModelSpec

    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    monkeypatch.setattr(llama, "require_file", lambda s: gguf)
    monkeypatch.setattr(
        llama, "_probe_command",
        lambda path, s: [sys.executable, "-c", "import sys; sys.exit('boom: bad tensor')"],
    )
    with pytest.raises(BackendError, match="boom: bad tensor"):
        llama.probe(ModelSpec(name="m", path=str(gguf)))


def test_cli_enables_faulthandler(monkeypatch: pytest.MonkeyPatch) -> None:
    """A native crash under `cre` prints a Python stack, not a bare 'Segmentation fault'."""
    import subprocess

    code = (
        "import faulthandler, sys; from crecli import cli; sys.argv = ['cre', '--version'];\n"
        "try:\n    cli.main()\nexcept SystemExit:\n    pass\nprint(faulthandler.is_enabled())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ}, check=True)
    assert out.stdout.strip().splitlines()[-1] == "True"


def test_stderr_silenced_by_two_threads_that_finish_out_of_order_is_restored(monkeypatch: pytest.MonkeyPatch) -> None:
    # Each saved and restored fd 2 on its own: the second saved /dev/null, finished last and
    # left it there, and cre serve's log went silent for good.
    import os
    import threading

    from crecli.models.runtime import quiet_stderr

    monkeypatch.delenv("CRE_DEBUG", raising=False)
    before = os.fstat(2)
    a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()

    def first() -> None:
        with quiet_stderr():
            a_in.set()
            b_in.wait(5)
        a_out.set()

    def second() -> None:
        a_in.wait(5)
        with quiet_stderr():
            b_in.set()
            a_out.wait(5)

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    after = os.fstat(2)
    assert (after.st_dev, after.st_ino) == (before.st_dev, before.st_ino)
