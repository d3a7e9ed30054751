"""Route-time assignment of new prompts to the log's clusters, in embedding space.

`Assigner` puts a prompt into one of the clusters `crecli.cluster.QueryClusterer` found
(k nearest exemplars, or nearest centroid), so routing needs no UMAP or HDBSCAN and
nothing in the router file but plain arrays. It is fitted at fit time (`Assigner.fit`,
with the distances that make its far threshold, radii and reaches) and rebuilt from a
router file's arrays at route time (`Assigner.from_state`); this module is all the
answering path loads of clustering, as hdbscan keeps prediction apart from fitting.

All vectors are expected L2-normalised (`crecli.embed` returns them so); the assigner
normalises again defensively, so cosine distance is `1 - dot`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterator

from crecli.vectors import normalize_rows
from crecli.errors import CreError, RouterFileError

if TYPE_CHECKING:
    import numpy as np

ASSIGN_METHODS = ("knn", "centroid")
# The auto far-threshold is this quantile of the training members' leave-one-out distances
# (see Assigner). 0.99 rather than the max so that one stray member does not widen it.
THRESHOLD_QUANTILE = 0.99
# A cluster's radius is this quantile of its own members' leave-one-out distances: how far
# a new prompt may sit from its nearest exemplar before it looks unlike the cluster's
# queries, so that the cluster's record speaks for it less (`quality.trust`).
RADIUS_QUANTILE = 0.9
# A cluster's reach is the farthest any of its members sits from its nearest other exemplar.
# A prompt beyond it is unlike every labelled query of the cluster, so their record cannot
# vouch for a cheap model there and the prompt starts on the fallback (`route`). Leave-tasks-out
# on the 1,400-query log showed why: held-out valid_parentheses prompts sat 0.30 from the
# sports_understanding cluster (reach 0.19, within the far threshold 0.50) and took its
# gemma, costing 6 points of accuracy on that fold.
REACH_QUANTILE = 1.0
# No cluster's reach is below this quantile of all the clusters' reaches (the median). A
# cluster whose labelled queries are copies of one template (the digits masked) has members
# 0 apart, so its raw reach is 0 and it would call even its own task's prompt unlike it when
# the prompt lacks the template's instruction line: on the 1,400-query log, "What is 12 plus
# 30?" sat 0.14 from the two-digit additions (reach 0.000; the median reach, 0.20). The
# held-out tasks the reach rule exists for sat farther (0.30 above).
REACH_FLOOR_QUANTILE = 0.5
_CHUNK = 1024  # query rows per similarity block, at most
# Floats in one similarity block (query rows x exemplars, 256 MiB of float32), so a router
# with many exemplars routes a batch in thinner blocks rather than in one that fills memory.
_BLOCK_FLOATS = 1 << 26
# What a router file may hold: fit keeps one exemplar per clustered query and votes among
# k=5. A file past these (a few MB deflated can declare hundreds of millions of rows) would
# make every prompt cost gigabytes of temporaries.
MAX_EXEMPLARS = 1 << 22
MAX_K = 256


def as_matrix(X: Any, what: str) -> "np.ndarray":
    """Embeddings as float32 unit rows; a CreError naming `what` when empty, not 2-D or not finite."""
    import numpy as np

    X = np.asarray(X, dtype=np.float32)
    if X.ndim != 2 or X.shape[0] == 0 or X.shape[1] == 0:
        raise CreError(f"{what}: expected a non-empty 2-D array of embeddings, got shape {X.shape}")
    if not np.isfinite(X).all():
        raise CreError(f"{what}: embeddings contain NaN or infinite values; re-embed the prompts")
    return normalize_rows(X)


def stored_rows(X: "np.ndarray") -> "np.ndarray":
    """Exemplar rows as a router file stores them: float16 (`Assigner._set_exemplars`)."""
    import numpy as np

    return np.asarray(X).astype(np.float16)


def _chunks(n: int, width: int = 1) -> Iterator[slice]:
    """Row blocks of `n` query rows, each compared with `width` exemplars or centroids."""
    step = max(1, min(_CHUNK, _BLOCK_FLOATS // max(1, width)))
    for start in range(0, n, step):
        yield slice(start, min(n, start + step))


class Assigner:
    """Route-time cluster assignment in embedding space.

    `method="knn"`: majority vote of the `k` nearest exemplars (the training prompts HDBSCAN
    put in a cluster), ties going to the cluster whose voters are nearer. `method="centroid"`:
    the nearest cluster centroid. Noise rows (label -1) are never exemplars.

    A prompt whose distance (cosine, to the nearest exemplar for knn or nearest centroid
    for centroid) exceeds `threshold_` is "far from every cluster" and gets -1. The auto
    threshold is the 0.99 quantile of the training members' leave-one-out distances: a
    query farther than that from everything known would be an outlier even among the
    clusters' own members, so no cluster's statistics describe it. `max_distance` fixes it
    instead.

    Learned: `exemplars_` (float32, from float16: `_set_exemplars`), `exemplar_labels_`, `classes_`, `centroids_` (one per
    class, normalised, in `classes_` order), `threshold_`, `k_` (k capped by the exemplar count),
    `radius_` and `reach_` (per class, in `classes_` order, RADIUS_QUANTILE and
    REACH_QUANTILE of its members' leave-one-out distances, the reach at least the
    REACH_FLOOR_QUANTILE of all classes' reaches; None in routers written before
    they were kept).
    """

    def __init__(self, method: str = "knn", k: int = 5, max_distance: float | None = None) -> None:
        self.method = method
        self.k = k
        self.max_distance = max_distance

    def _check_params(self) -> None:
        if self.method not in ASSIGN_METHODS:
            raise CreError(f"assign method {self.method!r} is not known; use one of {', '.join(ASSIGN_METHODS)}")
        if not isinstance(self.k, int) or not 1 <= self.k <= MAX_K:
            raise CreError(f"assigner k must be an integer from 1 to {MAX_K}, not {self.k!r}")
        if self.max_distance is not None and not 0 <= self.max_distance <= 2:
            raise CreError(f"max_distance is a cosine distance in [0, 2], not {self.max_distance!r}")

    def fit(self, X: "np.ndarray", labels: "np.ndarray") -> "Assigner":
        import numpy as np

        self._check_params()
        X = as_matrix(X, "Assigner.fit")
        labels = np.asarray(labels, dtype=np.int64)
        if labels.shape != (X.shape[0],):
            raise CreError(f"Assigner.fit: {len(labels)} labels for {X.shape[0]} rows")
        keep = labels >= 0
        if not keep.any():
            raise CreError("Assigner.fit: every row is noise (-1); there is no cluster to assign to")
        if keep.sum() > MAX_EXEMPLARS:  # a router file past it would not load
            raise CreError(f"Assigner.fit: {int(keep.sum()):,} clustered rows, more than a router holds "
                           f"({MAX_EXEMPLARS:,}); fit on a sample of the log")
        self._set_exemplars(stored_rows(X[keep]))
        self.exemplar_labels_ = labels[keep]
        self.classes_ = np.unique(self.exemplar_labels_)
        self.centroids_ = self._centroids(self.exemplars_, self.exemplar_labels_, self.classes_)
        self.k_ = min(self.k, len(self.exemplars_))
        self.radius_: "np.ndarray | None" = None
        self.reach_: "np.ndarray | None" = None
        dist = None
        if len(self.exemplars_) >= 2:
            _, dist = leave_one_out(self, self.exemplars_, self.exemplar_labels_)
            self.radius_, reach = (self._per_class(dist, q) for q in (RADIUS_QUANTILE, REACH_QUANTILE))
            self.reach_ = np.maximum(reach, np.quantile(reach, REACH_FLOOR_QUANTILE))
        if self.max_distance is not None:
            self.threshold_ = float(self.max_distance)
        elif dist is not None:
            self.threshold_ = float(np.quantile(dist, THRESHOLD_QUANTILE))
        else:
            raise CreError("leave-one-out assignment needs at least 2 clustered rows")
        return self

    def _set_exemplars(self, stored: "np.ndarray") -> None:
        """Exemplars from the float16 rows a router file stores, renormalised (rounding moves
        a unit vector's norm by up to 1e-3, which would make near distances negative).
        `fit` goes through here too, so the fitted distances, radii and threshold are the
        ones a loaded router computes."""
        import numpy as np

        self._stored_exemplars = stored
        self.exemplars_ = normalize_rows(stored.astype(np.float32)) if stored.dtype == np.float16 else stored

    def _per_class(self, dist: "np.ndarray", quantile: float) -> "np.ndarray":
        """The `quantile` of each class's leave-one-out distances, in `classes_` order.

        A one-member cluster under the centroid method has no leave-one-out distance (NaN):
        its figure is unknown, so its record is always trusted (2 is the widest)."""
        import numpy as np

        values = np.array([np.quantile(dist[self.exemplar_labels_ == c], quantile) for c in self.classes_],
                          dtype=np.float64)
        return np.where(np.isfinite(values), np.clip(values, 0.0, 2.0), 2.0)

    def _of_class(self, values: "np.ndarray | None", label: int) -> float | None:
        import numpy as np

        if label < 0 or values is None:
            return None
        at = int(np.searchsorted(self.classes_, label))
        if at >= len(self.classes_) or self.classes_[at] != label:
            return None
        return float(values[at])

    def radius(self, label: int) -> float | None:
        """Cluster `label`'s radius (see `radius_`); None when unknown."""
        return self._of_class(getattr(self, "radius_", None), label)

    def reach(self, label: int) -> float | None:
        """Cluster `label`'s reach (see `reach_`, REACH_QUANTILE); None when unknown."""
        return self._of_class(getattr(self, "reach_", None), label)

    @staticmethod
    def _centroids(X: "np.ndarray", labels: "np.ndarray", classes: "np.ndarray") -> "np.ndarray":
        import numpy as np

        sums = np.zeros((len(classes), X.shape[1]), dtype=np.float64)
        np.add.at(sums, np.searchsorted(classes, labels), X)
        return normalize_rows(sums)

    def _require_fitted(self) -> None:
        if not hasattr(self, "exemplars_"):
            raise CreError("the assigner is not fitted: call fit() with embeddings and cluster labels first")

    def _vote(self, sims: "np.ndarray", ex_labels: "np.ndarray", k: int) -> tuple["np.ndarray", "np.ndarray"]:
        """knn labels and nearest distances from a (queries, exemplars) similarity block."""
        import numpy as np

        top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(sims, top, axis=1), axis=1, kind="stable")
        top = np.take_along_axis(top, order, axis=1)
        cls = np.searchsorted(self.classes_, ex_labels[top])
        # One vote each, minus a hair per rank, so a tie in votes goes to the nearer voters.
        weights = 1.0 - 1e-6 * np.arange(k)
        scores = np.zeros((sims.shape[0], len(self.classes_)))
        np.add.at(scores, (np.arange(sims.shape[0])[:, None], cls), weights)
        nearest = 1.0 - sims[np.arange(sims.shape[0]), top[:, 0]]
        return self.classes_[scores.argmax(axis=1)], nearest

    def predict(self, X: "np.ndarray") -> tuple["np.ndarray", "np.ndarray"]:
        """(labels, distances): -1 where the distance exceeds `threshold_`."""
        import numpy as np

        self._require_fitted()
        X = as_matrix(X, "Assigner.predict")
        if X.shape[1] != self.exemplars_.shape[1]:
            raise CreError(
                f"Assigner.predict: embeddings have {X.shape[1]} dimensions, the clusters {self.exemplars_.shape[1]}; "
                "embed with the router's own embedder"
            )
        labels = np.empty(X.shape[0], dtype=np.int64)
        dist = np.empty(X.shape[0], dtype=np.float64)
        width = len(self.exemplars_) if self.method == "knn" else len(self.centroids_)
        for rows in _chunks(X.shape[0], width):
            if self.method == "knn":
                labels[rows], dist[rows] = self._vote(X[rows] @ self.exemplars_.T, self.exemplar_labels_, self.k_)
            else:
                sims = X[rows] @ self.centroids_.T
                best = sims.argmax(axis=1)
                labels[rows], dist[rows] = self.classes_[best], 1.0 - sims[np.arange(len(best)), best]
        labels[dist > self.threshold_] = -1
        return labels, dist

    def state(self) -> tuple[dict[str, Any], dict[str, "np.ndarray"]]:
        self._require_fitted()
        params = {"method": self.method, "k": self.k, "max_distance": self.max_distance,
                  "k_": self.k_, "threshold_": self.threshold_}
        # float16 exemplars: half the bytes of the largest array after the embedder's, and
        # unit vectors need no more precision to rank neighbours (`_set_exemplars`).
        stored = getattr(self, "_stored_exemplars", None)
        arrays = {"exemplars": stored if stored is not None else self.exemplars_, "exemplar_labels": self.exemplar_labels_,
                  "classes": self.classes_, "centroids": self.centroids_}
        for name in ("radius", "reach"):
            if getattr(self, f"{name}_", None) is not None:
                arrays[name] = getattr(self, f"{name}_")
        return params, arrays

    @classmethod
    def from_state(cls, params: dict[str, Any], arrays: dict[str, "np.ndarray"]) -> "Assigner":
        import numpy as np

        try:
            assigner = cls(method=str(params["method"]), k=int(params["k"]),
                           max_distance=None if params["max_distance"] is None else float(params["max_distance"]))
            assigner.k_ = int(params["k_"])
            assigner.threshold_ = float(params["threshold_"])
            stored = np.asarray(arrays["exemplars"])
            if stored.ndim != 2 or len(stored) > MAX_EXEMPLARS or not 1 <= int(params["k_"]) <= MAX_K:
                raise RouterFileError(
                    f"assigner state holds {stored.shape} exemplars voting {params['k_']} at a time, past what a "
                    f"fit writes (at most {MAX_EXEMPLARS:,} rows, k up to {MAX_K}); the router file is damaged, refit it")
            # float16 since int8 components; older routers stored float32, used as they are.
            assigner._set_exemplars(stored if stored.dtype == np.float16 else stored.astype(np.float32))
            assigner.exemplar_labels_ = np.asarray(arrays["exemplar_labels"], dtype=np.int64)
            assigner.classes_ = np.asarray(arrays["classes"], dtype=np.int64)
            assigner.centroids_ = np.asarray(arrays["centroids"], dtype=np.float32)
            for name in ("radius", "reach"):  # optional: routers written before them lack them
                values = arrays.get(name)
                setattr(assigner, f"{name}_", None if values is None else np.asarray(values, dtype=np.float64))
        except KeyError as exc:
            raise RouterFileError(f"assigner state lacks {exc.args[0]!r}; the router file is incomplete, refit it") from None
        except (TypeError, ValueError) as exc:
            raise RouterFileError(f"assigner state is unreadable ({exc}); the router file is damaged, refit it") from None
        ex, lab, cls_, cen = (assigner.exemplars_, assigner.exemplar_labels_, assigner.classes_, assigner.centroids_)

        def per_class_ok(values: "np.ndarray | None") -> bool:
            # Cosine distances, one per class.
            return values is None or (values.shape == cls_.shape and bool(np.all((values >= 0) & (values <= 2))))

        consistent = (
            ex.ndim == 2 and len(ex) > 0 and lab.shape == (len(ex),)
            and np.array_equal(np.unique(lab), cls_) and cen.shape == (len(cls_), ex.shape[1])
            # Unit rows, as fit writes them: a finite 3e38 would overflow the similarity to inf.
            # Exemplars too (float16 ones are renormalised, but an inf or NaN stays one; older
            # float32 ones are used as stored): at -inf every prompt looked familiar.
            and bool(np.all(np.abs(cen) <= 1.0 + 1e-3)) and bool(np.all(np.abs(ex) <= 1.0 + 1e-3))
            and 1 <= assigner.k_ <= len(ex)
            and per_class_ok(assigner.radius_) and per_class_ok(assigner.reach_)
        )
        if not consistent:
            shape = {name: None if v is None else v.shape for name, v in (("radius", assigner.radius_), ("reach", assigner.reach_))}
            raise RouterFileError(
                f"assigner state is inconsistent (exemplars {ex.shape}, labels {lab.shape}, "
                f"classes {cls_.shape}, centroids {cen.shape}, radius {shape['radius']}, reach {shape['reach']}); "
                "the router file is damaged, refit it"
            )
        try:
            assigner._check_params()
        except CreError as exc:
            raise RouterFileError(f"assigner state: {exc}") from None
        return assigner


def leave_one_out(assigner: Assigner, X: "np.ndarray", labels: "np.ndarray") -> tuple["np.ndarray", "np.ndarray"]:
    """Each labelled row's prediction (before the far threshold) with itself left out.

    X, labels: non-noise rows only. For knn a row is masked from its own neighbours; for
    centroid it is subtracted from its own cluster's centroid.
    """
    import numpy as np

    n = X.shape[0]
    pred = np.empty(n, dtype=np.int64)
    dist = np.empty(n, dtype=np.float64)
    if assigner.method == "knn":
        if n < 2:
            raise CreError("leave-one-out assignment needs at least 2 clustered rows")
        for rows in _chunks(n, n):
            sims = X[rows] @ X.T
            sims[np.arange(rows.stop - rows.start), np.arange(rows.start, rows.stop)] = -np.inf
            # At most n - 1 voters, so a row's own (masked) entry never gets a vote.
            pred[rows], dist[rows] = assigner._vote(sims, labels, min(assigner.k_, n - 1))
        return pred, dist
    classes = assigner.classes_
    sums = np.zeros((len(classes), X.shape[1]), dtype=np.float64)
    idx = np.searchsorted(classes, labels)
    np.add.at(sums, idx, X)
    unit = normalize_rows(sums)
    for rows in _chunks(n):
        sims = X[rows] @ unit.T
        own = normalize_rows(sums[idx[rows]] - X[rows])
        sims[np.arange(rows.stop - rows.start), idx[rows]] = np.einsum("ij,ij->i", X[rows], own)
        best = sims.argmax(axis=1)
        pred[rows], dist[rows] = classes[best], 1.0 - sims[np.arange(len(best)), best]
    return pred, dist
