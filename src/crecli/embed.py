"""Texts to vectors: the first stage of Cluster, Route, Escalate.

Two embedders share one interface (`vectors.Embedder`):

- `tfidf.TfidfEmbedder` (the default): TF-IDF on the query log, reduced by truncated SVD,
  travelling inside the router file as plain arrays.
- `LlamaEmbedder` (here): llama.cpp's embedding mode (mean pooling) on one of the GGUF
  models. Pretrained, so `fit` does nothing; its identity pins the model's sha256.

`make_embedder` builds one from models.toml's `[embedder]` (checked by
`config.check_embedder`, as models.toml is read too), `embedder_from_state` from a router
file. `embed_texts` batches and shows progress on stderr. For a `LlamaEmbedder` it also
caches vectors on disk in SQLite (raw float32 bytes, no pickle), keyed by (embedder
identity and the tokens of a text it embeds, `Embedder.cache_key`; sha256 of the text), so a
re-run embeds nothing twice. TF-IDF skips the cache
(see `TfidfEmbedder.cacheable`): it is refitted on every `cre fit`, and computing its
vectors is cheaper than reading them back.
"""

from __future__ import annotations

import hashlib
import sqlite3
from contextlib import closing
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

from crecli import console, paths
from crecli.config import check_embedder
from crecli.errors import ConfigError, CreError, RouterFileError
# Re-exported: the embedder interface and the TF-IDF embedder, where callers have long found them.
from crecli.tfidf import (  # noqa: F401
    MAX_TFIDF_DIMS, TFIDF_ANALYZERS, TfidfEmbedder, _mask_digits, char_terms, dequantize, quantize, word_terms,
)
from crecli.vectors import Embedder, normalize_rows  # noqa: F401

if TYPE_CHECKING:
    import numpy as np

    from crecli.config import ModelConfig
    from crecli.models.backend import Backend

class LlamaEmbedder(Embedder):
    """llama.cpp's embedding mode on a model from models.toml (mean pooling, normalised).

    The backend loads lazily on the first `transform`; call `close()` to free it. The
    identity pins the model file's sha256 (the pinned one, or the verified file's), so
    vectors from another file are never mixed in the cache or a router file.
    """

    kind = "llama"

    def __init__(self, model: str, settings: "ModelConfig") -> None:
        self.model = model
        self.settings = settings
        self._backend: "Backend | None" = None

    @property
    def spec(self) -> Any:
        return self.settings.get(self.model)

    @property
    def sha256(self) -> str | None:
        spec = self.spec
        if spec.sha256:
            return spec.sha256
        from crecli.models.pull import file_state

        return file_state(spec).sha256

    @property
    def cacheable(self) -> bool:  # type: ignore[override]
        # Without a known file hash the identity would not pin the vectors.
        return self.sha256 is not None

    @property
    def identity(self) -> str:
        # A text is embedded by its first `embed_truncation` tokens, which follow the model's
        # `context` here. Two contexts under EMBED_BATCH cut long prompts at other lengths,
        # so they embed (and route) them differently: the cut is part of what a router
        # records and checks, as of what the vector cache is keyed by. At the usual cut the
        # identity is as it was before it held the cut, so routers and cached vectors made
        # then still match.
        from crecli.models.llama import EMBED_BATCH, embed_truncation

        base = f"llama:{self.model}:{self.sha256 or 'unpinned'}"
        cut = embed_truncation(self.spec.context)
        return base if cut == EMBED_BATCH else f"{base}:truncate={cut}"

    @property
    def load_seconds(self) -> float:  # type: ignore[override]
        # The backend loads its model inside the first `transform`.
        return float(getattr(self._backend, "load_seconds", 0.0) or 0.0) if self._backend is not None else 0.0

    def transform(self, texts: Sequence[str]) -> "np.ndarray":
        import numpy as np

        if self._backend is None:
            from crecli.models.registry import backend_for

            self._backend = backend_for(self.spec)
        texts = list(texts)
        if not texts:
            return np.zeros((0, 0), dtype=np.float32)
        return normalize_rows(np.asarray(self._backend.embed(texts), dtype=np.float32))

    def state(self) -> tuple[dict[str, Any], dict[str, "np.ndarray"]]:
        return {"kind": self.kind, "model": self.model, "sha256": self.sha256}, {}

    @classmethod
    def from_state(
        cls, params: dict[str, Any], arrays: dict[str, "np.ndarray"], settings: "ModelConfig"
    ) -> "LlamaEmbedder":
        try:
            model = str(params["model"])
        except KeyError:
            raise RouterFileError("llama embedder state lacks 'model'; the router file is incomplete, refit it") from None
        emb = cls(model, settings)
        recorded = params.get("sha256")
        try:
            spec = settings.get(model)
        except ConfigError:
            raise RouterFileError(
                f"the router embeds prompts with model {model!r}"
                + (f" (sha256 {recorded})" if isinstance(recorded, str) else "")
                + ", which no models.toml defines; add it to your models.toml (`cre models path` shows where)"
            ) from None
        if recorded and spec.sha256 and recorded != spec.sha256:
            raise RouterFileError(
                f"the router embeds with {model!r} sha256 {recorded[:12]}…, but models.toml pins "
                f"{spec.sha256[:12]}… ({spec.set_in('sha256')}); use the model file the router was fitted with, or refit"
            )
        return emb

    def close(self) -> None:
        if self._backend is not None:
            self._backend.close()
            self._backend = None


# --- building an embedder from models.toml or a router file ----------------------------


def make_embedder(config: dict[str, Any], settings: "ModelConfig", seed: int = 0) -> Embedder:
    """An unfitted embedder from a models.toml `[embedder]` table, checked first
    (`config.check_embedder`; a ConfigError names the models.toml that set the field at fault).

    kind = "tfidf" (default) takes `dims` (256), `analyzer` ("word+char"), `min_df` (2) and
    `mask_digits` (true); kind = "llama" takes `model`, a model name from models.toml.
    """
    check_embedder(config, settings.models, settings.embedder_origins)
    fields = dict(config)
    if fields.pop("kind", "tfidf") == "llama":
        return LlamaEmbedder(str(fields["model"]), settings)
    return TfidfEmbedder(seed=seed, **fields)


def embedder_from_state(params: dict[str, Any], arrays: dict[str, "np.ndarray"], settings: "ModelConfig") -> Embedder:
    """Rebuild an embedder saved with `state()`, dispatching on params["kind"]."""
    kind = params.get("kind")
    classes: dict[str, type[Embedder]] = {"tfidf": TfidfEmbedder, "llama": LlamaEmbedder}
    if kind not in classes:
        raise RouterFileError(f"embedder kind {kind!r} is not known to this crecli (known: {', '.join(classes)})")
    return classes[kind].from_state(params, arrays, settings)


# --- the on-disk cache -----------------------------------------------------------------

def cache_path() -> Path:
    return paths.cache_dir() / "embeddings" / "vectors.sqlite"


def _text_key(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _open_cache() -> sqlite3.Connection:
    path = cache_path()
    paths.ensure(path.parent)
    conn = sqlite3.connect(path, timeout=30)
    conn.execute(
        "CREATE TABLE IF NOT EXISTS vectors (identity TEXT NOT NULL, text_sha256 TEXT NOT NULL, "
        "dims INTEGER NOT NULL, vector BLOB NOT NULL, PRIMARY KEY (identity, text_sha256))"
    )
    return conn


def _batches(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def embed_texts(embedder: Embedder, texts: Sequence[str], batch_size: int = 32, cache: bool = True) -> "np.ndarray":
    """Embed `texts` in batches with a progress bar on stderr, reusing cached vectors.

    Each batch is written to the cache as soon as it is computed, so an interrupted run
    resumes where it stopped. Duplicate texts are embedded once.
    """
    import numpy as np

    texts = list(texts)
    if batch_size < 1:
        raise CreError(f"batch_size must be at least 1, not {batch_size}")
    if not texts:
        return np.zeros((0, 0), dtype=np.float32)
    if not (cache and embedder.cacheable):
        return _compute(embedder, texts, batch_size)

    keys = [_text_key(t) for t in texts]
    text_of = dict(zip(keys, texts))
    unique = list(text_of)
    identity = embedder.cache_key
    found: dict[str, "np.ndarray"] = {}
    try:
        conn = _open_cache()
    except (sqlite3.Error, CreError, OSError) as exc:
        # The cache only saves time: an unwritable or corrupt one must not stop an answer.
        from crecli.console import warn

        warn(f"the embedding cache at {cache_path()} is unusable ({exc}); embedding without it")
        return _compute(embedder, texts, batch_size)
    with closing(conn):
        try:
            for chunk in _batches(unique, 500):
                rows = conn.execute(
                    "SELECT text_sha256, dims, vector FROM vectors WHERE identity = ? AND text_sha256 IN "
                    f"({','.join('?' * len(chunk))})",
                    (identity, *chunk),
                ).fetchall()
                for key, dims, blob in rows:
                    vec = np.frombuffer(blob, dtype="<f4")
                    if vec.shape == (dims,):
                        found[key] = vec
        except (sqlite3.Error, ValueError, TypeError) as exc:
            # Locked past its timeout, or damaged (a blob of the wrong length): as unusable as
            # one that cannot be opened, and as little reason to stop an answer.
            from crecli.console import warn

            warn(f"the embedding cache at {cache_path()} could not be read ({exc}); embedding without it")
            found.clear()
        missing = [k for k in unique if k not in found]
        if missing:

            failed: list[str] = []

            def store(start: int, vectors: "np.ndarray") -> None:
                if failed:
                    return
                try:
                    _store(conn, identity, missing[start:start + len(vectors)], vectors)
                except sqlite3.Error as exc:  # read-only or full: keep embedding, stop caching
                    from crecli.console import warn

                    failed.append(str(exc))
                    warn(f"cannot write the embedding cache at {cache_path()} ({exc}); going on without it")

            vectors = _compute(embedder, [text_of[k] for k in missing], batch_size, store)
            found.update(zip(missing, vectors))
    return np.stack([found[k] for k in keys]).astype(np.float32)


def _store(conn: sqlite3.Connection, identity: str, keys: Sequence[str], vectors: "np.ndarray") -> None:
    import numpy as np

    with conn:
        conn.executemany(
            "INSERT OR REPLACE INTO vectors VALUES (?, ?, ?, ?)",
            [(identity, k, int(v.shape[0]), np.ascontiguousarray(v, dtype="<f4").tobytes())
             for k, v in zip(keys, vectors)],
        )


def _compute(
    embedder: Embedder,
    texts: list[str],
    batch_size: int,
    on_batch: "Callable[[int, np.ndarray], None] | None" = None,
) -> "np.ndarray":
    """Embed in batches; `on_batch(start, vectors)` sees each batch as it is done."""
    import numpy as np

    out = []
    with console.progress() as bar:
        task = bar.add_task(f"embedding ({embedder.kind})", total=len(texts))
        for start in range(0, len(texts), batch_size):
            batch = texts[start:start + batch_size]
            vectors = embedder.transform(batch)
            if on_batch is not None:
                on_batch(start, vectors)
            out.append(vectors)
            bar.advance(task, len(batch))
    return np.concatenate(out).astype(np.float32, copy=False)
