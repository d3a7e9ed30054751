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
import time
from pathlib import Path

import pytest

from crecli import errors
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


@pytest.mark.parametrize("value", ["2", "maybe"])
def test_an_override_that_is_not_on_or_off_is_an_error(cpuinfo, monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    # Silently ignored, it left a user who meant 0 on a container hiding AMX with the crash.
    from crecli.errors import ConfigError

    cpuinfo(PLAIN_FLAGS)
    monkeypatch.setenv("CRE_LLAMA_EXTRA_BUFTS", value)
    with pytest.raises(ConfigError, match=f"CRE_LLAMA_EXTRA_BUFTS='{value}': use 0"):
        runtime.use_extra_bufts()
    monkeypatch.setenv("CRE_LLAMA_EXTRA_BUFTS", " ")  # blank is unset
    assert runtime.use_extra_bufts() is True


def test_a_vocabulary_llama_cpp_cannot_read_is_a_model_load_error(tmp_path: Path) -> None:
    # A bare ValueError, not a CreError: the batch summary's estimate (which catches only
    # CreError) ended a finished batch with a traceback.
    pytest.importorskip("llama_cpp")
    from crecli.config import ModelSpec
    from crecli.errors import ModelLoadError
    from crecli.models.backend import Rendered
    from crecli.models.llama import LlamaBackend

    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + bytes(60))
    with pytest.raises(ModelLoadError, match="could not read the vocabulary of 'bad'"):
        LlamaBackend(ModelSpec(name="bad", path=str(bad))).count_tokens(Rendered("hi", ()))


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


def test_loading_a_model_leaves_stderr_to_the_process_and_llama_cpps_log_to_cre_debug(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    # Loading silenced fd 2 for the whole process: whatever any thread wrote meanwhile (cre
    # serve's log, a native crash's last words) went to /dev/null. And llama-cpp-python's own
    # log callback reads ggml's levels shifted by one: it dropped llama.cpp's errors and
    # printed its warnings. Now llama.cpp's log goes through cre's callback: nothing without
    # CRE_DEBUG, everything with it, and cre points fd 2 nowhere (llama-cpp-python still
    # does, for the model file's read alone; test_real_prefix checks a warning stays off).
    import llama_cpp

    from crecli.config import ModelSpec

    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\xff" * 64)  # a GGUF magic and a broken header: llama.cpp logs an error
    real_init = llama_cpp.Llama.__init__

    def init(self: object, *args: object, **kwargs: object) -> None:
        os.write(2, b"written while the model loads\n")  # as another thread's log line would be
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(llama_cpp.Llama, "__init__", init)

    def load() -> str:
        with pytest.raises(BackendError):
            llama.LlamaBackend(ModelSpec(name="bad", path=bad)).llm
        return capfd.readouterr().err

    monkeypatch.delenv("CRE_DEBUG", raising=False)
    assert load() == "written while the model loads\n"
    monkeypatch.setenv("CRE_DEBUG", "1")
    shown = load()
    assert shown.startswith("written while the model loads\n") and "llama_model_load" in shown


def test_two_models_loading_at_once_leave_stdout_and_stderr_where_they_were(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # llama-cpp-python points fd 1 and 2 at /dev/null while it reads a model file, saving
    # and restoring them. A second load starting meanwhile (cre serve, two models at once)
    # saved the /dev/null and restored it last: the server's output was gone for good.
    import threading

    import llama_cpp.llama_cpp as low

    from crecli.config import ModelSpec

    monkeypatch.delenv("CRE_DEBUG", raising=False)
    # As on a CPU without AMX, where no lock of `model_params` happens to serialise loads.
    monkeypatch.setenv("CRE_LLAMA_EXTRA_BUFTS", "1")
    go, go_second = threading.Event(), threading.Event()
    entered: list[str] = []

    def load_from_file(path: bytes, params: object) -> None:
        entered.append(path.decode())
        # The first load holds /dev/null on fd 1 and 2 until the second has started, and
        # finishes first; the second, which saved that /dev/null, restores last.
        (go if len(entered) == 1 else go_second).wait(30)
        return None  # no model: llama-cpp-python raises, cre says it could not load

    monkeypatch.setattr(low, "llama_model_load_from_file", load_from_file)
    files = []
    for name in ("a", "b"):
        files.append(tmp_path / f"{name}.gguf")
        files[-1].write_bytes(b"GGUF")
    before = [os.fstat(fd) for fd in (1, 2)]
    streams = (sys.stdout, sys.stderr)
    errors: list[BaseException] = []

    def load(path: Path) -> None:
        try:
            llama.LlamaBackend(ModelSpec(name=path.stem, path=path)).llm
        except BaseException as exc:  # noqa: BLE001 - collected, asserted below
            errors.append(exc)

    one = threading.Thread(target=load, args=(files[0],))
    one.start()
    deadline = time.monotonic() + 30
    while not entered and time.monotonic() < deadline:
        time.sleep(0.01)
    two = threading.Thread(target=load, args=(files[1],))
    two.start()
    # Unserialised, the second load reaches the file read at once; serialised, it waits.
    deadline = time.monotonic() + 1.0
    while len(entered) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    go.set()
    one.join(30)
    go_second.set()
    two.join(30)
    after = [os.fstat(fd) for fd in (1, 2)]
    assert [(s.st_dev, s.st_ino) for s in after] == [(s.st_dev, s.st_ino) for s in before]
    assert sys.stdout is streams[0] and sys.stderr is streams[1]
    assert len(errors) == 2 and all(isinstance(e, BackendError) for e in errors), errors


def test_a_file_llama_cpp_refused_is_not_loaded_again_until_it_changes_or_a_minute_passes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # cre serve passes over a rung whose model cannot be loaded, but each request that reached
    # it paid another failed load: seconds each for a large corrupt file.
    import llama_cpp

    from crecli.config import ModelSpec

    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\xff" * 64)
    tries: list[str] = []
    real_init = llama_cpp.Llama.__init__

    def init(self: object, *args: object, **kwargs: object) -> None:
        tries.append("load")
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(llama_cpp.Llama, "__init__", init)
    backend = llama.LlamaBackend(ModelSpec(name="bad", path=bad))
    assert backend.refusal() is None  # not tried yet
    for _ in range(3):
        with pytest.raises(errors.ModelLoadError, match="llama.cpp could not load 'bad'"):
            backend.llm
    assert tries == ["load"]
    # What /health reads (`refusal`) follows the rule the loads follow.
    assert (backend.refusal() or "").startswith("llama.cpp could not load 'bad'")
    bad.write_bytes(b"GGUF" + b"\xfe" * 80)  # replaced: tried at once
    assert backend.refusal() is None
    with pytest.raises(errors.ModelLoadError):
        backend.llm
    assert len(tries) == 2 and backend.refusal() is not None
    monkeypatch.setattr(llama, "REFUSED_RETRY_SECONDS", 0.0)  # as a minute later
    assert backend.refusal() is None
    with pytest.raises(errors.ModelLoadError):
        backend.llm
    assert len(tries) == 3
