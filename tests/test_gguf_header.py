"""The GGUF header reader behind `--memory-budget --parallel` and `cre models list`'s "runs on"."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from crecli.config import ModelSpec
from crecli.errors import BackendError
from crecli.models import gguf


def write_header(path: Path, fields: dict[str, int | str | list[str]]) -> Path:
    """A GGUF file holding only metadata (no tensors): u32 ints, strings, string arrays."""
    def s(text: str) -> bytes:
        raw = text.encode()
        return struct.pack("<Q", len(raw)) + raw

    body = b""
    for key, value in fields.items():
        body += s(key)
        if isinstance(value, int):
            body += struct.pack("<II", 4, value)
        elif isinstance(value, str):
            body += struct.pack("<I", 8) + s(value)
        else:
            body += struct.pack("<IIQ", 9, 8, len(value)) + b"".join(s(v) for v in value)
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, len(fields)) + body)
    return path


QWEN_LIKE = {
    "general.architecture": "qwen2",
    "qwen2.block_count": 24,
    "qwen2.embedding_length": 896,
    "qwen2.attention.head_count": 14,
    "qwen2.attention.head_count_kv": 2,
    "tokenizer.ggml.tokens": ["a", "b", "<|im_end|>"],
}


def test_kv_bytes_per_token_from_the_header(tmp_path: Path) -> None:
    path = write_header(tmp_path / "q.gguf", QWEN_LIKE)
    # 24 layers x 2 KV heads x (64 + 64) x 2 bytes: qwen2.5-0.5b's figure.
    assert gguf.kv_bytes_per_token(path) == 24 * 2 * 128 * 2 == 12288
    gemma = write_header(tmp_path / "g.gguf", {"gemma3.block_count": 18, "gemma3.embedding_length": 640,
                                               "gemma3.attention.head_count": 4, "gemma3.attention.head_count_kv": 1,
                                               "gemma3.attention.key_length": 256, "gemma3.attention.value_length": 256})
    assert gguf.kv_bytes_per_token(gemma) == 18 * 1 * 512 * 2


def test_a_broken_header_is_a_backend_error(tmp_path: Path) -> None:
    path = write_header(tmp_path / "q.gguf", QWEN_LIKE)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(path.read_bytes()[:60])
    with pytest.raises(BackendError, match="GGUF header"):
        gguf.kv_bytes_per_token(cut)
    missing = write_header(tmp_path / "m.gguf", {"qwen2.block_count": 24})
    with pytest.raises(BackendError, match="has no"):
        gguf.kv_bytes_per_token(missing)


@pytest.mark.parametrize(("layers", "offload", "expected"), [
    (0, True, "CPU"), (10, False, "CPU (no GPU build)"), (10, True, "GPU 10/24 layers"),
    (24, True, "GPU 24/24 layers"), (99, True, "GPU"), (-1, True, "GPU"),
])
def test_placement(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, layers: int, offload: bool, expected: str) -> None:
    import llama_cpp

    monkeypatch.setattr(llama_cpp, "llama_supports_gpu_offload", lambda: offload)
    path = write_header(tmp_path / "q.gguf", QWEN_LIKE)
    assert gguf.placement(ModelSpec(name="q", path=str(path), n_gpu_layers=layers)) == expected
