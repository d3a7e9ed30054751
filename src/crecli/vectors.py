"""Vectors of texts: the interface every embedder implements, and unit-length rows.

Every embedder (`tfidf.TfidfEmbedder`, `embed.LlamaEmbedder`) returns float32 rows with
unit L2 norm, so a dot product is a cosine similarity everywhere downstream (routing,
clustering). An embedder's fitted state is plain JSON params and numeric or unicode
arrays (`Embedder.state`), so a router file carries it without pickle.
"""

from __future__ import annotations

import abc
import hashlib
import json
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:
    import numpy as np

    from crecli.config import ModelConfig


def normalize_rows(X: "np.ndarray") -> "np.ndarray":
    """float32 rows scaled to unit L2 norm; all-zero rows (no known token) stay zero."""
    import numpy as np

    X = np.asarray(X, dtype=np.float32)
    norms = np.linalg.norm(X, axis=1, keepdims=True)
    return X / np.where(norms > 0, norms, 1.0).astype(np.float32)


def _digest(params: dict[str, Any], arrays: dict[str, "np.ndarray"]) -> str:
    h = hashlib.sha256(json.dumps(params, sort_keys=True).encode())
    for name in sorted(arrays):
        a = arrays[name]
        h.update(f"{name}:{a.dtype.str}:{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


class Embedder(abc.ABC):
    """Texts -> float32 (n, d) with unit-norm rows. See the module docstring."""

    kind: str = ""
    # Whether `embed_texts` should cache this embedder's vectors on disk.
    cacheable: bool = True

    @property
    @abc.abstractmethod
    def identity(self) -> str:
        """A stable id of the embedder and its fitted state: equal ids give equal vectors."""

    @property
    def cache_key(self) -> str:
        """What `embed.embed_texts` keys this embedder's cached vectors by: its identity, and
        whatever else changes its vectors on this machine but not what a router records."""
        return self.identity

    @property
    def output_dims(self) -> int | None:
        """The width of the rows `transform` returns, where known without loading a model
        (None: a pretrained model's, known once it loads)."""
        return None

    @property
    def load_seconds(self) -> float:
        """Seconds spent loading a model this embedder runs, so far (0: it runs none). Routing
        time leaves them out (`route.route_many`), as an answer's time leaves out its models'
        loads."""
        return 0.0

    def fit(self, texts: Sequence[str]) -> "Embedder":
        """Learn from the log's texts; pretrained embedders ignore them."""
        return self

    @abc.abstractmethod
    def transform(self, texts: Sequence[str]) -> "np.ndarray":
        """float32 (len(texts), d), rows L2-normalised."""

    @abc.abstractmethod
    def state(self) -> tuple[dict[str, Any], dict[str, "np.ndarray"]]:
        """JSON-able params and plain numeric/unicode arrays that rebuild this embedder."""

    @classmethod
    @abc.abstractmethod
    def from_state(
        cls, params: dict[str, Any], arrays: dict[str, "np.ndarray"], settings: "ModelConfig"
    ) -> "Embedder":
        """The inverse of `state()`."""

    def close(self) -> None:
        """Free any loaded model. Safe to call twice."""
