"""The default embedder: TF-IDF on the query log, reduced by truncated SVD.

TF-IDF with sublinear term frequency, word 1-2 grams and optionally character 2-4 grams
inside word boundaries, reduced by truncated SVD. It is fitted on the query log and travels
inside the router file as plain arrays (vocabulary as a unicode array, idf weights, the SVD
components as int8 with a scale per component), so loading it never runs code. Fitting uses
scikit-learn; embedding at route time does not (`TfidfEmbedder.transform`), so `cre ask`
never pays for importing it. `bench/embedders.py` compares its clusters with llama.cpp's
embeddings on the real log.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, Callable, Sequence

# The settings' rules live with models.toml's other checks (`config.check_tfidf_field`).
from crecli.config import MAX_TFIDF_DIMS, TFIDF_ANALYZERS, TFIDF_FIELDS, check_tfidf_field  # noqa: F401
from crecli.errors import ConfigError, CreError, RouterFileError
from crecli.vectors import Embedder, _digest, normalize_rows

if TYPE_CHECKING:
    import numpy as np

    from crecli.config import ModelConfig


_DIGIT = re.compile(r"\d")


# Terms per vocabulary block (words; character n-grams). The 1,400-query log keeps 2,257
# words and 7,085 n-grams; a fit keeps at most this many of each (the most frequent), and a
# router file holding more, or a term twice, is refused: its lookup table is built in
# memory at load, and a small file of repeated terms asked for hundreds of MB.
MAX_TFIDF_TERMS = 1 << 20
# How far past 1 a stored SVD component's entry may be: the int8 round trip's float32
# rounding, no more.
COMPONENT_SLACK = 1e-3


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


def _lower(text: str) -> str:
    # NUL would not survive a numpy unicode array (it strips trailing NULs), so a term
    # holding one could not be stored in the router file.
    return text.replace("\0", " ").lower()


def _mask_digits(text: str) -> str:
    """Lowercase, and every digit becomes 0: a number keeps its length (which tells
    2-digit from 3-digit arithmetic) but not its value (which says nothing about the task)."""
    return _DIGIT.sub("0", _lower(text))


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
        for name in TFIDF_FIELDS:
            check_tfidf_field(name, getattr(self, name))

    def _vectorizers(self, min_df: int = 1) -> list[Any]:
        import numpy as np
        from sklearn.feature_extraction.text import TfidfVectorizer

        # float64, as `transform` computes the rows from the stored float64 idf.
        common = {"sublinear_tf": True, "min_df": min_df, "dtype": np.float64, "max_features": MAX_TFIDF_TERMS,
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
        if X.shape[1] < 2:
            # TruncatedSVD needs two features; one shared term cannot tell prompts apart anyway.
            raise CreError(
                f"the tfidf embedder kept {X.shape[1]} term from {len(texts)} texts (min_df {self.min_df}, "
                f"analyzer {self.analyzer!r}): too few to tell prompts apart; lower `min_df` or use "
                "analyzer = \"word+char\" in models.toml's [embedder]"
            )
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

    @property
    def output_dims(self) -> int:
        self._require_fitted()
        return int(self.components_.shape[0])

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
                        or codes.ndim != 2 or not np.all((scale >= 0) & (scale <= 1.0)):
                    # An SVD component is a unit row, so its scale (largest entry / 127) is
                    # under 1/127: a larger one is no fit's, and near float32's top it overflows.
                    raise RouterFileError(
                        f"tfidf embedder state: components_q8 {codes.dtype} {codes.shape} and components_scale "
                        f"{scale.dtype} {scale.shape} do not fit together; the router file is damaged, refit it")
                emb.components_ = dequantize(codes, scale)
        except KeyError as exc:
            raise RouterFileError(f"tfidf embedder state lacks {exc.args[0]!r}; the router file is incomplete, refit it") from None
        n_features = len(emb.word_vocab_) + len(emb.char_vocab_)
        if emb.word_vocab_.dtype.kind != "U" or emb.char_vocab_.dtype.kind != "U":
            raise RouterFileError("tfidf embedder state: vocabularies must be unicode arrays; refit the router")
        flat = (emb.word_vocab_, emb.char_vocab_, emb.word_idf_, emb.char_idf_)
        # idf = log((1 + n) / (1 + df)) + 1 >= 1: a 2-D, non-positive or infinite one is no fit's.
        if any(a.ndim != 1 for a in flat) \
                or not all(np.all((a > 0) & np.isfinite(a)) for a in (emb.word_idf_, emb.char_idf_)):
            raise RouterFileError("tfidf embedder state: vocabularies and idf weights must be flat, "
                                  "the weights positive and finite; the router file is damaged, refit it")
        # Checked before the lookups are built (a dict of every term) and before np.unique sorts them.
        if max(len(emb.word_vocab_), len(emb.char_vocab_)) > MAX_TFIDF_TERMS \
                or any(len(np.unique(v)) != len(v) for v in (emb.word_vocab_, emb.char_vocab_)):
            raise RouterFileError(
                f"tfidf embedder state: {len(emb.word_vocab_):,} words and {len(emb.char_vocab_):,} n-grams, "
                f"past what a fit keeps ({MAX_TFIDF_TERMS:,} of each, each once); the router file is damaged, refit it")
        # An SVD component is a unit row, so no entry is past 1 (int8 rounding aside). A larger
        # one is no fit's, and near float32's top it overflows: every prompt would then embed
        # as NaN and fail at routing, far from the file. Both stored forms are held to it:
        # int8 codes times a scale, and the float32 rows of routers written before them.
        if not np.all(np.abs(emb.components_) <= 1.0 + COMPONENT_SLACK):
            raise RouterFileError("tfidf embedder state: the SVD components are not unit rows (an entry is past 1 "
                                  "or not a number); the router file is damaged, refit it")
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
