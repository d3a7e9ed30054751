"""Texts to vectors: the first stage of Cluster, Route, Escalate.

Two embedders share one interface:

- `TfidfEmbedder` (the default): TF-IDF with sublinear term frequency, word 1-2 grams and
  optionally character 2-4 grams inside word boundaries, reduced by truncated SVD. It is
  fitted on the query log and travels inside the router file as plain arrays (vocabulary
  as a unicode array, idf weights, SVD components), so loading it never runs code. Its
  cost per prompt is measured in README "Cluster"; `bench/embedders.py` compares its
  clusters with llama.cpp's embeddings on the real log.
- `LlamaEmbedder`: llama.cpp's embedding mode (mean pooling) on one of the GGUF models.
  Pretrained, so `fit` does nothing; its identity pins the model's sha256.

Every embedder returns float32 rows with unit L2 norm, so a dot product is a cosine
similarity everywhere downstream.

`embed_texts` batches and shows progress on stderr. For a `LlamaEmbedder` it also caches
vectors on disk in SQLite (raw float32 bytes, no pickle), keyed by (embedder identity,
sha256 of the text), so a re-run embeds nothing twice. TF-IDF skips the cache (see
`TfidfEmbedder.cacheable`): it is refitted on every `cre fit`, and computing its vectors
is cheaper than reading them back.
"""

from __future__ import annotations

import abc
import hashlib
import json
import re
import sqlite3
from contextlib import closing
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

from crecli import console, paths
from crecli.errors import ConfigError, CreError, RouterFileError

if TYPE_CHECKING:
    import numpy as np

    from crecli.config import ModelConfig
    from crecli.models.backend import Backend

TFIDF_ANALYZERS = ("word", "word+char")
EMBEDDER_KINDS = ("tfidf", "llama")
_DIGIT = re.compile(r"\d")


# The SVD's width: past a few thousand dimensions the router file grows and routing slows
# for no gain (256 is the measured default).
MAX_TFIDF_DIMS = 4096


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# scikit-learn's analyzers, as TfidfVectorizer runs them with our preprocessor: the word
# tokens of its default token_pattern and their bigrams (ngram_range (1, 2)), and
# "char_wb" 2-4 grams of each whitespace-separated word padded with a space. `transform`
# uses these at route time; `fit` learns the vocabulary with scikit-learn itself, and
# tests/test_embed.py checks that both list the same terms.
_TOKEN = re.compile(r"(?u)\b\w+\b")
_WHITE_SPACES = re.compile(r"\s\s+")
WORD_NGRAMS = (1, 2)
CHAR_NGRAMS = (2, 4)


def word_terms(text: str) -> list[str]:
    """A preprocessed text's word terms: its tokens, then each pair of neighbours."""
    tokens = _TOKEN.findall(text)
    return tokens + [" ".join(tokens[i : i + 2]) for i in range(len(tokens) - 1)]


def char_terms(text: str) -> list[str]:
    """A preprocessed text's character 2-4 grams within words padded by a space (a word
    shorter than n gives its one padded n-gram once)."""
    grams: list[str] = []
    lo, hi = CHAR_NGRAMS
    for word in _WHITE_SPACES.sub(" ", text).split():
        word = f" {word} "
        for n in range(lo, hi + 1):
            offset = 0
            grams.append(word[:n])
            while offset + n < len(word):
                offset += 1
                grams.append(word[offset : offset + n])
            if offset == 0:
                break
    return grams


def quantize(rows: "np.ndarray") -> tuple["np.ndarray", "np.ndarray"]:
    """Each row as int8 codes times one float32 scale (its largest magnitude / 127).

    The TF-IDF SVD's components are most of a router file (256 x ~9,000 floats on a
    1,400-query log). In int8 the file is a quarter the size; an embedding moves by at most
    0.006 in any coordinate, and on the 1,400 log prompts, and on the same prompts with a
    fifth of their words dropped, not one cluster assignment changed (bench/router_size.py).
    """
    import numpy as np

    rows = np.asarray(rows, dtype=np.float32)
    scale = (np.abs(rows).max(axis=1) / 127.0).astype(np.float32)
    safe = np.where(scale > 0, scale, 1.0)
    codes = np.clip(np.rint(rows / safe[:, None]), -127, 127).astype(np.int8)
    return codes, scale


def dequantize(codes: "np.ndarray", scale: "np.ndarray") -> "np.ndarray":
    """The float32 rows `quantize` encoded."""
    import numpy as np

    return (codes.astype(np.float32) * np.asarray(scale, dtype=np.float32)[:, None]).astype(np.float32)


def normalize_rows(X: "np.ndarray") -> "np.ndarray":
    """float32 rows scaled to unit L2 norm; all-zero rows (no known token) stay zero."""
    import numpy as np

    X = np.asarray(X, dtype=np.float32)
    norms = np.linalg.norm(X, axis=1, keepdims=True)
    return X / np.where(norms > 0, norms, 1.0).astype(np.float32)


def _lower(text: str) -> str:
    # NUL would not survive a numpy unicode array (it strips trailing NULs), so a term
    # holding one could not be stored in the router file.
    return text.replace("\0", " ").lower()


def _mask_digits(text: str) -> str:
    """Lowercase, and every digit becomes 0: a number keeps its length (which tells
    2-digit from 3-digit arithmetic) but not its value (which says nothing about the task)."""
    return _DIGIT.sub("0", _lower(text))


def _digest(params: dict[str, Any], arrays: dict[str, "np.ndarray"]) -> str:
    h = hashlib.sha256(json.dumps(params, sort_keys=True).encode())
    for name in sorted(arrays):
        a = arrays[name]
        h.update(f"{name}:{a.dtype.str}:{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


# --- the interface and the two embedders ------------------------------------------------


class Embedder(abc.ABC):
    """Texts -> float32 (n, d) with unit-norm rows. See the module docstring."""

    kind: str = ""
    # Whether `embed_texts` should cache this embedder's vectors on disk.
    cacheable: bool = True

    @property
    @abc.abstractmethod
    def identity(self) -> str:
        """A stable id of the embedder and its fitted state: equal ids give equal vectors."""

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


class TfidfEmbedder(Embedder):
    """TF-IDF (sublinear tf) then truncated SVD to `dims`, fitted on the log.

    Word 1-2 grams always; `analyzer="word+char"` adds character 2-4 grams within word
    boundaries as a second, equally weighted block, so words sharing pieces land near each
    other. `min_df` drops terms seen in fewer prompts (they cannot shape a cluster, and
    they grow the router file). `mask_digits` maps every digit to 0 before tokenising.
    The defaults (256 dims, word+char, min_df 2, masked digits) scored best on the real
    log: NMI 0.976, ARI 0.918 against its 16 tasks (bench/embedders.py). The SVD uses
    `random_state=seed`, so a fit is reproducible.

    Learned: `dims_` (dims, capped by what the data can support), `word_vocab_`,
    `word_idf_`, `char_vocab_`, `char_idf_` (empty for "word"), `components_` (dims_, n_features).
    """

    kind = "tfidf"
    # No disk cache: the identity changes with every fit, so the log's vectors are never read
    # back by a later fit, and at route time prompts are new, where a cache miss plus write
    # cost 23 ms against 4 ms for the transform itself (one prompt at a time, 2 shared cores;
    # 0.26 ms per prompt in batches of 480).
    cacheable = False

    def __init__(self, dims: int = 256, analyzer: str = "word+char", min_df: int = 2, mask_digits: bool = True,
                 seed: int = 0) -> None:
        self.dims = dims
        self.analyzer = analyzer
        self.min_df = min_df
        self.mask_digits = mask_digits
        self.seed = seed

    def _params(self) -> dict[str, Any]:
        return {"kind": self.kind, "dims": self.dims, "analyzer": self.analyzer, "min_df": self.min_df,
                "mask_digits": self.mask_digits, "seed": self.seed}

    def _check_params(self) -> None:
        # bool is an int to Python; `min_df = true` in TOML is a typo, not 1.
        if not _is_int(self.min_df) or self.min_df < 1:
            raise ConfigError(f"tfidf min_df must be an integer >= 1, not {self.min_df!r}")
        if not isinstance(self.mask_digits, bool):
            raise ConfigError(f"tfidf mask_digits must be true or false, not {self.mask_digits!r}")
        if self.analyzer not in TFIDF_ANALYZERS:
            raise ConfigError(
                f"tfidf analyzer {self.analyzer!r} is not known; use one of {', '.join(TFIDF_ANALYZERS)}"
            )
        if not _is_int(self.dims) or not 2 <= self.dims <= MAX_TFIDF_DIMS:
            raise ConfigError(f"tfidf dims must be an integer from 2 to {MAX_TFIDF_DIMS}, not {self.dims!r}")

    def _vectorizers(self, min_df: int = 1) -> list[Any]:
        import numpy as np
        from sklearn.feature_extraction.text import TfidfVectorizer

        # float64, as `transform` computes the rows from the stored float64 idf.
        common = {"sublinear_tf": True, "min_df": min_df, "dtype": np.float64,
                  "preprocessor": _mask_digits if self.mask_digits else _lower}
        vecs = [TfidfVectorizer(analyzer="word", ngram_range=WORD_NGRAMS, token_pattern=_TOKEN.pattern, **common)]
        if self.analyzer == "word+char":
            vecs.append(TfidfVectorizer(analyzer="char_wb", ngram_range=CHAR_NGRAMS, **common))
        return vecs

    def fit(self, texts: Sequence[str]) -> "TfidfEmbedder":
        import numpy as np
        from sklearn.decomposition import TruncatedSVD
        from threadpoolctl import threadpool_limits

        self._check_params()
        texts = list(texts)
        if len(texts) < 2:
            raise CreError(f"the tfidf embedder needs at least 2 texts to fit, got {len(texts)}")
        vecs = self._vectorizers(self.min_df)
        try:
            blocks = [v.fit_transform(texts) for v in vecs]
        except ValueError as exc:  # sklearn: "empty vocabulary; perhaps the documents only contain stop words"
            raise CreError(f"the tfidf embedder found no words to learn from: {exc}") from None
        X = self._stack(blocks)
        # SVD needs fewer components than both features and samples; beyond the rank, the
        # extra components would be noise.
        self.dims_ = int(max(1, min(self.dims, X.shape[1] - 1, X.shape[0] - 1)))
        svd = TruncatedSVD(n_components=self.dims_, random_state=self.seed)
        # One BLAS thread: with another process busy on one of 2 cores, OpenBLAS's spinning
        # threads made this SVD take 12 s instead of 0.7 s on the 480-prompt log.
        with threadpool_limits(limits=1, user_api="blas"):
            svd.fit(X)
        # The router file stores the components as int8 with a scale per component
        # (`quantize`), a quarter of float32; fit uses the same rounded numbers the file
        # holds, so a loaded router embeds exactly as the fit did.
        self.components_ = dequantize(*quantize(svd.components_))
        self.word_vocab_, self.word_idf_ = self._export(vecs[0])
        if len(vecs) > 1:
            self.char_vocab_, self.char_idf_ = self._export(vecs[1])
        else:
            self.char_vocab_, self.char_idf_ = np.array([], dtype="<U1"), np.array([], dtype=np.float64)
        self._lookups = self._build_lookups()
        self._identity = ""
        return self

    @staticmethod
    def _export(vec: Any) -> tuple["np.ndarray", "np.ndarray"]:
        import numpy as np

        terms = [""] * len(vec.vocabulary_)
        for term, col in vec.vocabulary_.items():
            terms[col] = term
        return np.array(terms, dtype=str), np.asarray(vec.idf_, dtype=np.float64)

    def _build_lookups(self) -> list[tuple[dict[str, int], "np.ndarray", Callable[[str], list[str]], int]]:
        """Per block (words, then characters): term -> column in the block, the block's idf,
        the analyzer that lists a text's terms, and the block's first column in the
        components. Plain Python and numpy: routing never imports scikit-learn."""
        preprocess = _mask_digits if self.mask_digits else _lower
        blocks = [(self.word_vocab_, self.word_idf_, lambda text: word_terms(preprocess(text)))]
        if self.analyzer == "word+char":
            blocks.append((self.char_vocab_, self.char_idf_, lambda text: char_terms(preprocess(text))))
        lookups = []
        offset = 0
        for vocab, idf, terms in blocks:
            lookups.append(({str(t): i for i, t in enumerate(vocab.tolist())}, idf, terms, offset))
            offset += len(vocab)
        return lookups

    @staticmethod
    def _stack(blocks: list[Any]) -> Any:
        import scipy.sparse as sp

        return blocks[0] if len(blocks) == 1 else sp.hstack(blocks).tocsr()

    @property
    def fitted(self) -> bool:
        return hasattr(self, "components_")

    def _require_fitted(self) -> None:
        if not self.fitted:
            raise CreError("the tfidf embedder is not fitted: call fit() on the log's prompts first")

    def transform(self, texts: Sequence[str]) -> "np.ndarray":
        """Each text's TF-IDF row times the SVD components, unit length.

        The rows are what scikit-learn's TfidfVectorizer gives with the fitted vocabulary
        and idf (sublinear tf, idf, each block L2-normalised; tests/test_embed.py checks it
        against scikit-learn), computed here so that `cre ask` does not spend the 1-2 s that
        importing scikit-learn takes on a 2-core machine.
        """
        import numpy as np

        self._require_fitted()
        texts = list(texts)
        out = np.zeros((len(texts), self.components_.shape[0]), dtype=np.float64)
        for row, text in enumerate(texts):
            cols: list["np.ndarray"] = []
            vals: list["np.ndarray"] = []
            for lookup, idf, terms, offset in self._lookups:
                counts: dict[int, int] = {}
                for term in terms(text):
                    col = lookup.get(term)
                    if col is not None:
                        counts[col] = counts.get(col, 0) + 1
                if not counts:
                    continue
                idx = np.fromiter(counts.keys(), dtype=np.int64, count=len(counts))
                tf = np.fromiter(counts.values(), dtype=np.float64, count=len(counts))
                weights = (np.log(tf) + 1.0) * idf[idx]
                cols.append(idx + offset)
                vals.append(weights / np.sqrt(np.dot(weights, weights)))
            if cols:
                idx = np.concatenate(cols)
                out[row] = self.components_[:, idx].astype(np.float64) @ np.concatenate(vals)
        return normalize_rows(out)

    @property
    def identity(self) -> str:
        self._require_fitted()
        if not getattr(self, "_identity", ""):
            params, arrays = self.state()
            self._identity = f"tfidf:{_digest(params, arrays)[:16]}"
        return self._identity

    def state(self) -> tuple[dict[str, Any], dict[str, "np.ndarray"]]:
        self._require_fitted()
        params = {**self._params(), "dims_": self.dims_}
        codes, scale = quantize(self.components_)
        arrays = {
            "word_vocab": self.word_vocab_,
            "word_idf": self.word_idf_,
            "char_vocab": self.char_vocab_,
            "char_idf": self.char_idf_,
            "components_q8": codes,
            "components_scale": scale,
        }
        return params, arrays

    @classmethod
    def from_state(
        cls, params: dict[str, Any], arrays: dict[str, "np.ndarray"], settings: "ModelConfig | None" = None
    ) -> "TfidfEmbedder":
        import numpy as np

        try:
            emb = cls(dims=int(params["dims"]), analyzer=str(params["analyzer"]), min_df=int(params["min_df"]),
                      mask_digits=bool(params["mask_digits"]), seed=int(params["seed"]))
            emb.dims_ = int(params["dims_"])
            emb.word_vocab_ = np.asarray(arrays["word_vocab"])
            emb.char_vocab_ = np.asarray(arrays["char_vocab"])
            emb.word_idf_ = np.asarray(arrays["word_idf"], dtype=np.float64)
            emb.char_idf_ = np.asarray(arrays["char_idf"], dtype=np.float64)
            if "components" in arrays:  # routers written before int8 components
                emb.components_ = np.asarray(arrays["components"], dtype=np.float32)
            else:
                codes, scale = np.asarray(arrays["components_q8"]), np.asarray(arrays["components_scale"])
                if codes.dtype != np.int8 or scale.dtype.kind != "f" or scale.shape != (codes.shape[0],) \
                        or codes.ndim != 2 or not np.all(scale >= 0):
                    raise RouterFileError(
                        f"tfidf embedder state: components_q8 {codes.dtype} {codes.shape} and components_scale "
                        f"{scale.dtype} {scale.shape} do not fit together; the router file is damaged, refit it")
                emb.components_ = dequantize(codes, scale)
        except KeyError as exc:
            raise RouterFileError(f"tfidf embedder state lacks {exc.args[0]!r}; the router file is incomplete, refit it") from None
        n_features = len(emb.word_vocab_) + len(emb.char_vocab_)
        if emb.word_vocab_.dtype.kind != "U" or emb.char_vocab_.dtype.kind != "U":
            raise RouterFileError("tfidf embedder state: vocabularies must be unicode arrays; refit the router")
        if emb.components_.shape != (emb.dims_, n_features) or len(emb.word_idf_) != len(emb.word_vocab_) \
                or len(emb.char_idf_) != len(emb.char_vocab_):
            raise RouterFileError(
                f"tfidf embedder state is inconsistent (components {emb.components_.shape}, "
                f"{n_features} features, dims {emb.dims_}); the router file is damaged, refit it"
            )
        try:
            emb._check_params()
        except ConfigError as exc:
            raise RouterFileError(f"tfidf embedder state: {exc}") from None
        emb._lookups = emb._build_lookups()
        return emb


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
        return f"llama:{self.model}:{self.sha256 or 'unpinned'}"

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
        spec = settings.get(model)
        if recorded and spec.sha256 and recorded != spec.sha256:
            raise RouterFileError(
                f"the router embeds with {model!r} sha256 {recorded[:12]}…, but models.toml pins "
                f"{spec.sha256[:12]}… ({spec.defined_in}); use the model file the router was fitted with, or refit"
            )
        return emb

    def close(self) -> None:
        if self._backend is not None:
            self._backend.close()
            self._backend = None


# --- building an embedder from models.toml or a router file ----------------------------


def make_embedder(config: dict[str, Any], settings: "ModelConfig", seed: int = 0) -> Embedder:
    """An unfitted embedder from a models.toml `[embedder]` table.

    kind = "tfidf" (default) takes `dims` (256), `analyzer` ("word+char"), `min_df` (2) and
    `mask_digits` (true); kind = "llama" takes `model`, a model name from models.toml.
    """
    config = dict(config)
    kind = config.pop("kind", "tfidf")
    if kind == "tfidf":
        allowed = {"dims", "analyzer", "min_df", "mask_digits"}
        _reject_unknown(kind, config, allowed)
        emb: Embedder = TfidfEmbedder(seed=seed, **config)
        emb._check_params()  # type: ignore[attr-defined]
        return emb
    if kind == "llama":
        _reject_unknown(kind, config, {"model"})
        if "model" not in config:
            raise ConfigError('[embedder] kind = "llama" needs `model = "<name>"`, a model from models.toml')
        settings.get(str(config["model"]))  # fail now, with the known names, not at first use
        return LlamaEmbedder(str(config["model"]), settings)
    raise ConfigError(f"[embedder] kind {kind!r} is not known; use one of {', '.join(EMBEDDER_KINDS)}")


def _reject_unknown(kind: str, config: dict[str, Any], allowed: set[str]) -> None:
    unknown = set(config) - allowed
    if unknown:
        raise ConfigError(
            f"[embedder] kind = {kind!r} has unknown field(s): {', '.join(sorted(unknown))} "
            f"(known: kind, {', '.join(sorted(allowed))})"
        )


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
    identity = embedder.identity
    found: dict[str, "np.ndarray"] = {}
    try:
        conn = _open_cache()
    except (sqlite3.Error, CreError, OSError) as exc:
        # The cache only saves time: an unwritable or corrupt one must not stop an answer.
        from crecli.console import warn

        warn(f"the embedding cache at {cache_path()} is unusable ({exc}); embedding without it")
        return _compute(embedder, texts, batch_size)
    with closing(conn):
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
