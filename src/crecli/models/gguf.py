"""What a GGUF file's header tells before the model loads: KV-cache bytes per token, and
where llama.cpp will run the model.

The header's integer metadata (layers, heads, key and value widths) is read straight from
the file, so `--memory-budget --parallel` and `cre models list`'s "runs on" cost no load.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

from crecli.errors import BackendError

if TYPE_CHECKING:
    from crecli.config import ModelSpec


# GGUF value types (gguf.GGUFValueType): fixed sizes by type id; 8 is a string, 9 an array.
_GGUF_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_GGUF_INTS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 10: "<Q", 11: "<q"}


@lru_cache(maxsize=16)
def _gguf_ints(path: Path, mtime_ns: int) -> dict[str, int]:
    """The integer metadata of a GGUF file's header (arrays and strings are skipped)."""
    import struct

    found: dict[str, int] = {}
    with open(path, "rb") as f:
        magic, _version, _n_tensors, n_kv = struct.unpack("<4sIQQ", f.read(24))
        if magic != b"GGUF":
            raise BackendError(f"{path} is not a GGUF file")

        def skip(kind: int) -> None:
            if kind == 8:
                f.seek(struct.unpack("<Q", f.read(8))[0], 1)
            elif kind == 9:
                item, count = struct.unpack("<IQ", f.read(12))
                if item in _GGUF_SIZES:
                    f.seek(_GGUF_SIZES[item] * count, 1)
                else:
                    for _ in range(count):
                        skip(item)
            else:
                f.seek(_GGUF_SIZES[kind], 1)

        for _ in range(n_kv):
            key = f.read(struct.unpack("<Q", f.read(8))[0]).decode("utf-8", errors="replace")
            kind = struct.unpack("<I", f.read(4))[0]
            if kind in _GGUF_INTS:
                fmt = _GGUF_INTS[kind]
                found[key] = struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0]
            else:
                skip(kind)
    return found


def kv_bytes_per_token(path: Path) -> int:
    """Bytes of KV cache one token takes in every layer, at 16-bit K and V."""
    import struct

    try:
        meta = _gguf_ints(path, path.stat().st_mtime_ns)
    except (OSError, KeyError, ValueError, struct.error) as exc:  # a truncated or odd header
        raise BackendError(f"cannot read the GGUF header of {path}: {exc}") from exc
    arch = next((k.split(".")[0] for k in meta if k.endswith(".block_count")), "")
    try:
        layers = meta[f"{arch}.block_count"]
        heads = meta[f"{arch}.attention.head_count"]
        heads_kv = meta.get(f"{arch}.attention.head_count_kv", heads)
        head_dim = meta[f"{arch}.embedding_length"] // max(1, heads)
    except KeyError as exc:
        raise BackendError(f"{path}: the GGUF header has no {exc.args[0]}") from None
    k = meta.get(f"{arch}.attention.key_length", head_dim)
    v = meta.get(f"{arch}.attention.value_length", head_dim)
    return layers * heads_kv * (k + v) * 2


def placement(spec: "ModelSpec") -> str:
    """Where llama.cpp runs `spec`: "CPU", "GPU" (every layer) or "GPU k/n layers".

    From `n_gpu_layers` in models.toml, the model's layer count (its GGUF header, when the
    file is here) and whether this llama-cpp-python build can offload at all: a CPU-only
    build ignores `n_gpu_layers`.
    """
    if spec.n_gpu_layers == 0:
        return "CPU"
    try:
        import llama_cpp

        offload = bool(llama_cpp.llama_supports_gpu_offload())
    except Exception:  # pragma: no cover - install problem, reported elsewhere
        offload = False
    if not offload:
        return "CPU (no GPU build)"
    layers = None
    if spec.file is not None and spec.file.is_file():
        try:
            meta = _gguf_ints(spec.file, spec.file.stat().st_mtime_ns)
            layers = next((v for k, v in meta.items() if k.endswith(".block_count")), None)
        except Exception:  # an unreadable header only loses the layer count
            layers = None
    # llama.cpp offloads the output layer too once n_gpu_layers exceeds the repeating layers.
    if spec.n_gpu_layers < 0 or (layers is not None and spec.n_gpu_layers > layers):
        return "GPU"
    if layers is None:
        return f"GPU {spec.n_gpu_layers} layers"
    return f"GPU {spec.n_gpu_layers}/{layers} layers"
