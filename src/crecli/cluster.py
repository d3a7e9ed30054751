"""Clustering the query log at fit time: UMAP + HDBSCAN, then noise handling.

`QueryClusterer` finds the log's clusters: UMAP (`crecli.reduce.Reducer`) to a few
dimensions, then HDBSCAN, then the noise handling described in its docstring, and fits
the `crecli.assign.Assigner` that puts new prompts into those clusters at route time.
`agreement()` measures, leave-one-out, how often the assigner reproduces HDBSCAN's own
labels on the training prompts.

Nothing here runs when a prompt is answered: the answering path loads `crecli.assign`
only, never this module, UMAP or HDBSCAN.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from crecli.assign import Assigner, as_matrix, leave_one_out
from crecli.errors import CreError

if TYPE_CHECKING:
    import numpy as np

MIN_ROWS = 10


def default_min_cluster_size(n: int) -> int:
    """HDBSCAN's smallest cluster for n prompts: sqrt(n) / 2, at least 5 (11 at n = 480).

    A cluster's model is chosen from its members' correctness labels, so it needs enough
    members for an accuracy to mean something. Too large a value merges distinct tasks;
    too small only splits a task into sub-clusters, which costs little. ARI against the
    real log's 16 tasks with the default embedder (bench/embedders.py --grid --sample N):
    n = 160: 0.897 at the default 6, 0.594 at 11; n = 240: 0.910 at the default 8, 0.606
    at 15; n = 480: 0.918 at the default 11, 0.935 at 15, 0.935 at 30. sqrt(n) / 2 stays on
    the safe side of that cliff.
    """
    return max(5, round(math.sqrt(n) / 2))


def default_min_samples(min_cluster_size: int) -> int:
    """HDBSCAN's density smoothing: a third of min_cluster_size, at least 2 (4 at n = 480).

    On the real log with the default embedder and min_cluster_size 11, min_samples 1, 2,
    4, 10 gave ARI 0.883, 0.901, 0.918, 0.918 (bench/embedders.py --grid).
    """
    return max(2, round(min_cluster_size / 3))


def agreement(assigner: Assigner, X: "np.ndarray", labels: "np.ndarray") -> float:
    """Share of non-noise rows whose leave-one-out assignment equals their label.

    Uses `assigner`'s method, k and fitted `threshold_` (a row judged far counts as a miss),
    with the rows of (X, labels) as exemplars: a row never votes for itself, so this is
    what route time would do for a new prompt like it.
    """
    import numpy as np

    assigner._require_fitted()
    X = as_matrix(X, "agreement")
    labels = np.asarray(labels, dtype=np.int64)
    keep = labels >= 0
    if not keep.any():
        raise CreError("agreement: every row is noise (-1); there is nothing to compare")
    pred, dist = leave_one_out(assigner, X[keep], labels[keep])
    pred[dist > assigner.threshold_] = -1
    return float((pred == labels[keep]).mean())


class QueryClusterer:
    """UMAP + HDBSCAN on the log's embeddings, with noise handling and an Assigner.

    Defaults scale with the number of rows fitted, n: `n_neighbors` ->
    `reduce.default_n_neighbors(n)` (~0.7 sqrt(n) in [5, 30]), `min_cluster_size` ->
    `default_min_cluster_size(n)` (sqrt(n) / 2, at least 5), `min_samples` ->
    `default_min_samples(min_cluster_size)` (a third, at least 2).

    Large logs: when n > `max_fit_rows`, UMAP and HDBSCAN see a random sample of
    `max_fit_rows` rows (seeded by `seed`); the other rows are assigned like new prompts.

    Noise handling: HDBSCAN leaves points in sparse regions unlabelled (-1). Each such point
    gets the label the `Assigner` (k nearest exemplars in embedding space) gives it, if it is
    within the assigner's distance threshold; otherwise it stays -1, "unclustered", and the
    router sends such prompts (and new prompts far from every cluster) to the router
    file's fallback model. If HDBSCAN finds no cluster at all, the log has no structure to
    route on: every row becomes cluster 0, so calibration picks one model for everything.
    (UMAP ties every point to its nearest neighbours, so a handful of stray prompts often
    joins a cluster instead of staying noise; new strays are still judged by distance.)

    Learned: `fit_index_` (rows used to fit, sorted), `raw_labels_` (HDBSCAN's labels of
    X[fit_index_], -1 = noise), `labels_` (one per row of X, after noise handling and
    assignment of unsampled rows), `n_clusters_`, `assigner_`, `reducer_`, and the resolved
    `n_neighbors_`, `n_components_`, `min_cluster_size_`, `min_samples_`.
    """

    def __init__(self, n_components: int = 8, n_neighbors: int | None = None, min_cluster_size: int | None = None,
                 min_samples: int | None = None, seed: int | None = 0, max_fit_rows: int = 20000) -> None:
        self.n_components = n_components
        self.n_neighbors = n_neighbors
        self.min_cluster_size = min_cluster_size
        self.min_samples = min_samples
        self.seed = seed
        self.max_fit_rows = max_fit_rows

    def fit(self, X: "np.ndarray") -> "QueryClusterer":
        import numpy as np

        from crecli.reduce import Reducer

        X = as_matrix(X, "QueryClusterer.fit")
        n = X.shape[0]
        if n < MIN_ROWS:
            raise CreError(f"clustering needs at least {MIN_ROWS} prompts, got {n}; add more queries to the log")
        if self.max_fit_rows < MIN_ROWS:
            raise CreError(f"max_fit_rows must be at least {MIN_ROWS}, not {self.max_fit_rows}")
        if n > self.max_fit_rows:
            rng = np.random.default_rng(self.seed)
            self.fit_index_ = np.sort(rng.choice(n, size=self.max_fit_rows, replace=False))
        else:
            self.fit_index_ = np.arange(n)
        X_fit = X[self.fit_index_]
        m = len(self.fit_index_)

        self.min_cluster_size_ = self.min_cluster_size or default_min_cluster_size(m)
        self.min_samples_ = self.min_samples or default_min_samples(self.min_cluster_size_)
        if not 2 <= self.min_cluster_size_ <= m:
            raise CreError(f"min_cluster_size must be between 2 and the {m} rows fitted, not {self.min_cluster_size_}")

        self.reducer_ = Reducer(n_components=self.n_components, n_neighbors=self.n_neighbors, seed=self.seed)
        reduced = self.reducer_.fit_transform(X_fit)
        self.n_neighbors_ = self.reducer_.n_neighbors_
        self.n_components_ = self.reducer_.n_components_  # capped by the rows and the width
        self.raw_labels_ = self._hdbscan(reduced)

        fit_labels = self.raw_labels_.copy()
        if (fit_labels < 0).all():
            fit_labels[:] = 0
        self.n_clusters_ = int(len(np.unique(fit_labels[fit_labels >= 0])))
        self.assigner_ = Assigner().fit(X_fit, fit_labels)

        self.labels_ = np.full(n, -1, dtype=np.int64)
        self.labels_[self.fit_index_] = fit_labels
        # Noise rows and unsampled rows alike are assigned like new prompts: -1 if far.
        noise_in_fit = np.zeros(n, dtype=bool)
        noise_in_fit[self.fit_index_[fit_labels < 0]] = True
        unsampled = np.ones(n, dtype=bool)
        unsampled[self.fit_index_] = False
        todo = np.flatnonzero(noise_in_fit | unsampled)
        if len(todo):
            self.labels_[todo], _ = self.assigner_.predict(X[todo])
        return self

    def _hdbscan(self, reduced: "np.ndarray") -> "np.ndarray":
        import numpy as np
        import hdbscan

        model = hdbscan.HDBSCAN(min_cluster_size=self.min_cluster_size_, min_samples=self.min_samples_)
        return np.asarray(model.fit_predict(reduced.astype(np.float64)), dtype=np.int64)
