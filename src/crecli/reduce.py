"""UMAP (cosine metric) from embedding space down to a few dimensions for HDBSCAN.

Density-based clustering degrades in hundreds of dimensions, where all distances look
alike; UMAP with `min_dist=0` packs each neighbourhood tightly, which is what HDBSCAN
needs. Only fitting uses UMAP: routing assigns new prompts in embedding space
(`crecli.assign.Assigner`), so no UMAP model has to travel in the router file.
"""

from __future__ import annotations

import math
import os
import warnings
from typing import TYPE_CHECKING, Any

from crecli import paths
from crecli.errors import CreError

if TYPE_CHECKING:
    import numpy as np


def default_n_neighbors(n: int) -> int:
    """UMAP's neighbourhood size for n points: about 0.7 * sqrt(n), within [5, 30], below n.

    15 (UMAP's own default) at n = 480; it grows slowly so that large logs keep their
    global structure without the k-NN graph cost growing linearly with n. It barely
    matters on the real 480-prompt log: mean ARI over the min_cluster_size/min_samples grid
    was 0.913, 0.909 and 0.913 at 10, 15 and 30 with the default embedder
    (bench/embedders.py --grid --nn 10,15,30).
    """
    return max(2, min(n - 1, max(5, min(30, round(0.7 * math.sqrt(n))))))


def _import_umap() -> Any:
    # numba compiles UMAP's kernels on first use (tens of seconds); a cache dir makes that
    # a one-time cost per machine instead of per run. numba reads it once, at import.
    if "NUMBA_CACHE_DIR" not in os.environ:
        os.environ["NUMBA_CACHE_DIR"] = str(paths.ensure(paths.cache_dir() / "numba"))
    import umap

    _cache_umap_kernels()
    return umap


def _cache_umap_kernels() -> None:
    """Turn on numba's disk cache for umap-learn's module-level kernels.

    umap-learn declares almost none of them with `cache=True`, so every process compiled
    them again: the first fit of a fresh process took 18 s on 2 cores, 0.2 s with this.
    `Dispatcher.enable_caching` is what `cache=True` itself calls; numba keys the cache on
    the source file and its own version, so upgrading umap or numba recompiles. Kernels that
    cannot be cached (they reference global arrays) are skipped by numba with a warning,
    silenced in `Reducer.fit`. If numba's internals move, we only lose the speed-up.
    """
    try:
        import umap.distances
        import umap.layouts
        import umap.spectral
        import umap.umap_
        import umap.utils
        from numba.core.caching import NullCache
        from numba.core.dispatcher import Dispatcher
    except ImportError:
        return
    for module in (umap.umap_, umap.utils, umap.layouts, umap.spectral, umap.distances):
        for obj in vars(module).values():
            if isinstance(obj, Dispatcher) and isinstance(getattr(obj, "_cache", None), NullCache):
                try:
                    obj.enable_caching()
                except AttributeError:  # a numba without this method: compile as before
                    return


class Reducer:
    """UMAP to `n_components` dimensions with the cosine metric.

    `n_neighbors=None` resolves to `default_n_neighbors(n)`. With a `seed`, results are
    reproducible, also across processes (UMAP then runs single-threaded; see `init` below). Learned: `embedding_` (n, d),
    `n_neighbors_`, `n_components_` (capped at n - 2 and at the input's dimensions).
    """

    def __init__(self, n_components: int = 8, n_neighbors: int | None = None, min_dist: float = 0.0,
                 seed: int | None = 0) -> None:
        self.n_components = n_components
        self.n_neighbors = n_neighbors
        self.min_dist = min_dist
        self.seed = seed

    def fit(self, X: "np.ndarray") -> "Reducer":
        import numpy as np

        X = np.asarray(X, dtype=np.float32)
        n = X.shape[0] if X.ndim == 2 else 0
        if n < 4:
            raise CreError(f"UMAP needs at least 4 points to reduce, got {n}")
        self.n_neighbors_ = self.n_neighbors or default_n_neighbors(n)
        if not 2 <= self.n_neighbors_ < n:
            raise CreError(f"n_neighbors must be between 2 and n - 1 = {n - 1}, not {self.n_neighbors_}")
        self.n_components_ = max(1, min(self.n_components, n - 2, X.shape[1]))
        umap = _import_umap()
        model = umap.UMAP(
            n_components=self.n_components_,
            n_neighbors=self.n_neighbors_,
            min_dist=self.min_dist,
            metric="cosine",
            # Not UMAP's default spectral start: a query log's k-NN graph falls apart into
            # one component per prompt template, and ARPACK's per-component eigenvectors are
            # then degenerate, so layouts (and clusters) changed from one process to the next
            # even with a seed. PCA's start gave identical results across processes and the
            # same quality on the real log (NMI 0.976, ARI 0.918 with the default settings).
            init="pca",
            random_state=self.seed,
        )
        with warnings.catch_warnings():
            # "n_jobs value 1 overridden to 1 by setting random_state": expected, we want determinism.
            warnings.filterwarnings("ignore", message=".*n_jobs.*overridden.*")
            # Tiny or highly duplicated inputs make the spectral start warn and fall back; harmless.
            warnings.filterwarnings("ignore", message=".*[Ss]pectral initiali[sz]ation failed.*")
            warnings.filterwarnings("ignore", message=".*disconnected.*")
            warnings.filterwarnings("ignore", message="Cannot cache compiled function")
            self.embedding_ = np.asarray(model.fit_transform(X), dtype=np.float32)
        return self

    def fit_transform(self, X: "np.ndarray") -> "np.ndarray":
        return self.fit(X).embedding_
