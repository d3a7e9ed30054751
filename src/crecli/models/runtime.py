"""llama.cpp's runtime in this process: its threads, its C-level log, AMX CPUs, the crash hint.

`default_threads` is the usable core count (`CRE_THREADS` overrides it): llama.cpp's
threads spin while they wait, so more threads than cores (or another process computing
beside) collapses throughput; two models of one process computing at once do not
(bench/models_at_once.py). On AMX CPUs llama.cpp's extra buffer types stay off (`use_extra_bufts`,
applied by `model_params`), since a native build crashes there at the first decode;
`CRASH_HINT` is what a user is told when llama.cpp dies in native code all the same.
`abort_on_cancel` lets a request that gives up stop a decode in the middle (a long prompt's
evaluation included). Nothing here loads a model: the backend (`models/llama.py`) does.
"""

from __future__ import annotations

import os
import sys
import threading
from contextlib import contextmanager
from functools import lru_cache
from typing import Any, Iterator


def default_threads() -> int:
    value = os.environ.get("CRE_THREADS", "").strip()
    if value:
        try:
            threads = int(value)
        except ValueError:
            threads = 0
        if threads < 1:
            from crecli.errors import ConfigError

            raise ConfigError(f"CRE_THREADS={value!r}: give a whole number of threads, 1 or more (or unset it)")
        return threads
    try:
        cores = max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - macOS
        cores = max(1, os.cpu_count() or 1)
    quota = cpu_quota()
    # In a container limited to N CPUs (`docker --cpus`) the affinity still shows every host
    # core; llama.cpp's spinning threads beyond the quota are throttled, and decode slows.
    return min(cores, quota) if quota is not None else cores


def cpu_quota(root: str = "/sys/fs/cgroup") -> int | None:
    """The CPUs this process's cgroup may use (its CFS quota over its period, rounded up);
    None when it has no quota or none can be read."""
    import math

    def read(name: str) -> str | None:
        try:
            with open(os.path.join(root, name)) as fh:
                return fh.read().strip()
        except OSError:
            return None

    v2 = read("cpu.max")  # cgroup v2: "QUOTA PERIOD" or "max PERIOD"
    if v2 is not None:
        parts = v2.split()
        quota, period = (parts + ["", ""])[:2]
    else:  # cgroup v1
        quota, period = read("cpu/cpu.cfs_quota_us") or "", read("cpu/cpu.cfs_period_us") or ""
    try:
        q, per = int(quota), int(period)
    except ValueError:
        return None  # "max", or nothing to read
    return max(1, math.ceil(q / per)) if q > 0 and per > 0 else None


_LOG_LOCK = threading.Lock()
_log_callback: Any = None  # held here: llama.cpp keeps only a pointer to it
# llama-cpp-python (verbose=False) points fd 1 and 2 at /dev/null while it reads a model
# file, saving and restoring them; two loads at once would each restore the other's
# /dev/null, and `cre serve`'s output would stay silent for good.
_LOAD_LOCK = threading.Lock()


def route_llama_log() -> None:
    """Send llama.cpp's C-level log (model loading, context warnings) through cre: dropped,
    or on stderr with CRE_DEBUG=1. Once per process, after llama_cpp is imported (its import
    installs llama-cpp-python's own callback, which this replaces).

    Why not llama-cpp-python's callback: it reads ggml's log levels shifted by one (this
    llama.cpp numbers DEBUG 1 to ERROR 4; it takes 3, WARN, for ERROR), so with verbose=False
    it prints warnings ("decode: removing memory module entries" after an aborted decode) and
    drops the errors. Why not point fd 2 at /dev/null around a load and a context's creation,
    as cre did: fd 2 is the process's, so every other thread's stderr (`cre serve`'s log) was
    lost meanwhile. With this callback nothing of llama.cpp's reaches fd 2 (checked on the
    three default models: loading, vocab-only, embedding, decoding); what still silences fd 1
    and 2, for a model file's read only, is llama-cpp-python itself (`loading`).
    """
    global _log_callback
    with _LOG_LOCK:
        if _log_callback is not None:
            return
        import ctypes

        import llama_cpp

        @llama_cpp.llama_log_callback
        def log(level: int, text: bytes, data: Any) -> None:
            if os.environ.get("CRE_DEBUG"):
                sys.stderr.write(text.decode("utf-8", "replace"))
                sys.stderr.flush()

        llama_cpp.llama_log_set(log, ctypes.c_void_p(0))
        _log_callback = log


@contextmanager
def loading() -> Iterator[bool]:
    """Around constructing a `Llama`: one load at a time, llama.cpp's log routed
    (`route_llama_log`); yields the `verbose` to construct it with.

    verbose=False (the default) keeps llama-cpp-python's own prints off stderr, at the cost
    of its silencing fd 1 and 2 for the model file's read (a fraction of a second with mmap;
    `_LOAD_LOCK` says why one at a time). CRE_DEBUG=1 shows everything instead: verbose=True,
    no silencing, llama.cpp's log on stderr.
    """
    route_llama_log()
    with _LOAD_LOCK:
        yield bool(os.environ.get("CRE_DEBUG"))


@lru_cache(maxsize=1)
def _flag_reader() -> Any:
    """libc's `strlen` as a llama.cpp abort callback (`bool (*)(void *)`).

    llama.cpp's compute loop calls its abort callback after every graph node (hundreds a
    decode). A Python callback would take the GIL each time: with another thread of `cre
    serve` holding it, the computing thread would wait up to a switch interval per node while
    the other compute threads spin. `strlen` of a one-byte flag ("" or "\x01") answers with
    no Python at all: 0 (go on) until the flag is set, then 1 (abort)."""
    import ctypes

    import llama_cpp

    try:
        strlen = ctypes.CDLL(None).strlen
    except (TypeError, OSError, AttributeError):  # pragma: no cover - Windows: no dlopen(NULL)
        strlen = ctypes.cdll.msvcrt.strlen
    return ctypes.cast(strlen, llama_cpp.ggml_abort_callback)


@contextmanager
def abort_on_cancel(ctx: Any, token: Any) -> Iterator[None]:
    """While the block runs, `token` (a `cancel.Token`, or None for none) cancelled aborts the
    llama.cpp context `ctx`'s decode at its next graph node: `llama_decode` returns 2, which
    llama-cpp-python raises as a RuntimeError and cre's own decodes as a BackendError; either,
    once the token is set, leaves the block as `cancel.Cancelled`.

    Between tokens a stopping criterion already stops generation; this stops the prompt's
    evaluation too, which on 2 cores can hold a model for tens of seconds for a long prompt.
    llama.cpp drops the aborted batch's KV cells, and llama-cpp-python counts only the
    batches it finished, so the context's cache and tokens stay in step for the next prompt.
    """
    if token is None:
        yield
        return
    import ctypes

    import llama_cpp

    flag = ctypes.create_string_buffer(2)  # two NULs: strlen 0

    def stop() -> None:
        flag[0] = b"\x01"  # one byte: a racing read sees 0 or 1, both valid answers

    from crecli.cancel import Cancelled
    from crecli.errors import BackendError

    remove = token.on_cancel(stop)
    llama_cpp.llama_set_abort_callback(ctx, _flag_reader(), ctypes.cast(flag, ctypes.c_void_p))
    try:
        yield
    except (RuntimeError, BackendError):
        if token.is_set():
            raise Cancelled("the request gave up") from None
        raise
    finally:
        llama_cpp.llama_set_abort_callback(ctx, llama_cpp.ggml_abort_callback(), None)
        remove()


# What a user is told when llama.cpp dies in native code: the process is gone, so this is
# printed by the parent of a probe (`cre models bench`) or pointed to by faulthandler.
CRASH_HINT = (
    "llama.cpp crashed in native code ({how}) while loading or running {what}. "
    "On Xeons with AMX (lscpu shows amx_int8) a native llama.cpp build crashes at the first "
    "decode when weights go into its AMX buffers (ggml-org/llama.cpp#20824). cre turns those "
    "buffers off on AMX CPUs it can see; if you forced them on, unset CRE_LLAMA_EXTRA_BUFTS, and "
    "where /proc/cpuinfo hides AMX (some containers) set CRE_LLAMA_EXTRA_BUFTS=0. Otherwise "
    "rebuild llama-cpp-python without native CPU tuning: CMAKE_ARGS=\"-DGGML_NATIVE=OFF "
    "-DLLAVA_BUILD=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF "
    "-DLLAMA_BUILD_SERVER=OFF\" pip install --force-reinstall --no-cache-dir --no-deps llama-cpp-python "
    "(a wheel from pip's cache may have been built for another CPU). Run with CRE_DEBUG=1 to "
    "see llama.cpp's own log."
)


CPUINFO = "/proc/cpuinfo"


@lru_cache(maxsize=1)
def cpu_has_amx() -> bool:
    """Whether this CPU advertises AMX tiles (Linux /proc/cpuinfo; False where unknown)."""
    try:
        with open(CPUINFO, encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return "amx_int8" in line.split() or "amx_tile" in line.split()
    except OSError:
        pass
    return False


def use_extra_bufts() -> bool:
    """Whether llama.cpp may put weights in its extra (repacked or AMX) CPU buffer types.

    Off on AMX CPUs: there a native build routes weights into the AMX buffer type and the
    first decode segfaults (ggml-org/llama.cpp#20824). Everywhere else the repacked layouts
    stay on, because they are llama.cpp's faster CPU kernels. `CRE_LLAMA_EXTRA_BUFTS=0/1`
    overrides the choice (README, "Set up", has the measured cost of each).
    """
    forced = os.environ.get("CRE_LLAMA_EXTRA_BUFTS", "").strip().lower()
    if forced in ("0", "false", "no", "off"):
        return False
    if forced in ("1", "true", "yes", "on"):
        return True
    if forced:
        # Ignored, it left a user who meant to force the buffers off (on a container that
        # hides AMX) with the crash they meant to avoid, and no word of why.
        from crecli.errors import ConfigError

        raise ConfigError(f"CRE_LLAMA_EXTRA_BUFTS={os.environ['CRE_LLAMA_EXTRA_BUFTS']!r}: use 0 (off) or 1 (on), "
                          "or unset it to let crecli decide")
    return not cpu_has_amx()


# llama-cpp-python's high-level `Llama` builds its llama_model_params itself and has no
# argument for `use_extra_bufts`, so the default-params factory it calls is wrapped for the
# duration of one construction. The lock keeps two threads from interleaving the swap.
_PARAMS_LOCK = threading.Lock()


@contextmanager
def model_params(extra_bufts: bool) -> Iterator[None]:
    import llama_cpp.llama_cpp as low

    if extra_bufts or not hasattr(low.llama_model_params, "_fields_") or "use_extra_bufts" not in dict(
        low.llama_model_params._fields_
    ):
        yield
        return
    with _PARAMS_LOCK:
        original = low.llama_model_default_params

        def without_extra_bufts() -> Any:
            params = original()
            params.use_extra_bufts = False
            return params

        low.llama_model_default_params = without_extra_bufts
        try:
            yield
        finally:
            low.llama_model_default_params = original
