from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest

from crecli import assign, cluster
from crecli.assign import Assigner
from crecli.cluster import QueryClusterer, agreement
from crecli.errors import CreError, RouterFileError
from crecli.reduce import Reducer, default_n_neighbors

QUERYLOG = Path(__file__).resolve().parents[1] / "examples" / "querylog.jsonl"


def blobs(n_per: int = 30, k: int = 4, d: int = 32, spread: float = 0.08, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """k tight groups of unit vectors around orthogonal directions."""
    rng = np.random.default_rng(seed)
    centres = np.eye(d)[:k]
    X = np.concatenate([c + spread * rng.normal(size=(n_per, d)) for c in centres])
    y = np.repeat(np.arange(k), n_per)
    return (X / np.linalg.norm(X, axis=1, keepdims=True)).astype(np.float32), y


def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    from sklearn.metrics import adjusted_rand_score

    return adjusted_rand_score(a, b) == 1.0


@pytest.fixture(scope="module")
def fitted() -> tuple[QueryClusterer, np.ndarray, np.ndarray]:
    X, y = blobs()
    return QueryClusterer(seed=0).fit(X), X, y


def test_clusterer_finds_the_blobs(fitted: tuple[QueryClusterer, np.ndarray, np.ndarray]) -> None:
    qc, X, y = fitted
    assert qc.n_clusters_ == 4
    assert same_partition(qc.labels_, y)
    # __init__ parameters stay as given; resolved values live in *_ attributes.
    assert (qc.n_neighbors, qc.min_cluster_size, qc.min_samples) == (None, None, None)
    assert qc.min_cluster_size_ == cluster.default_min_cluster_size(len(X))
    assert qc.min_samples_ == cluster.default_min_samples(qc.min_cluster_size_)
    assert qc.n_neighbors_ == default_n_neighbors(len(X))
    np.testing.assert_array_equal(qc.fit_index_, np.arange(len(X)))
    assert qc.reducer_.embedding_.shape == (len(X), 8)


def test_clusterer_is_deterministic_with_a_seed(fitted: tuple[QueryClusterer, np.ndarray, np.ndarray]) -> None:
    qc, X, _ = fitted
    again = QueryClusterer(seed=0).fit(X)
    np.testing.assert_array_equal(again.reducer_.embedding_, qc.reducer_.embedding_)
    np.testing.assert_array_equal(again.raw_labels_, qc.raw_labels_)
    np.testing.assert_array_equal(again.labels_, qc.labels_)


def test_noise_gets_the_nearest_cluster_only_when_near(monkeypatch: pytest.MonkeyPatch) -> None:
    X, y = blobs()
    rng = np.random.default_rng(1)
    # Three stray prompts pointing away from every blob, plus two ordinary members of
    # blobs 0 and 1, all called noise by HDBSCAN. (With real UMAP, strays this few get
    # glued to a neighbouring cluster, so HDBSCAN's answer is fixed here.)
    stray = np.zeros((3, X.shape[1]), dtype=np.float32)
    stray[:, 10:] = rng.normal(size=(3, X.shape[1] - 10))
    stray /= np.linalg.norm(stray, axis=1, keepdims=True)
    raw = np.concatenate([y, [-1, -1, -1]])
    raw[[0, 31]] = -1
    monkeypatch.setattr(QueryClusterer, "_hdbscan", lambda self, reduced: raw.copy())
    qc = QueryClusterer(seed=0).fit(np.concatenate([X, stray]))
    np.testing.assert_array_equal(qc.raw_labels_, raw)
    np.testing.assert_array_equal(qc.labels_, np.concatenate([y, [-1, -1, -1]]))
    assert qc.n_clusters_ == 4
    # Exemplars never include noise rows.
    assert len(qc.assigner_.exemplars_) == len(X) - 2


def test_all_noise_becomes_one_cluster(monkeypatch: pytest.MonkeyPatch) -> None:
    X, _ = blobs(n_per=6)
    monkeypatch.setattr(QueryClusterer, "_hdbscan", lambda self, reduced: np.full(len(reduced), -1))
    qc = QueryClusterer(seed=0).fit(X)
    assert qc.n_clusters_ == 1
    assert (qc.raw_labels_ == -1).all()
    assert (qc.labels_ == 0).all()


def test_large_logs_fit_on_a_sample_and_assign_the_rest() -> None:
    X, y = blobs(n_per=30)
    qc = QueryClusterer(seed=0, max_fit_rows=60).fit(X)
    assert len(qc.fit_index_) == 60 and len(np.unique(qc.fit_index_)) == 60
    assert (np.diff(qc.fit_index_) > 0).all()
    assert qc.raw_labels_.shape == (60,)
    assert qc.labels_.shape == (len(X),)
    assert qc.n_clusters_ == 4
    assert same_partition(qc.labels_, y)
    again = QueryClusterer(seed=0, max_fit_rows=60).fit(X)
    np.testing.assert_array_equal(again.fit_index_, qc.fit_index_)
    other = QueryClusterer(seed=1, max_fit_rows=60).fit(X)
    assert not np.array_equal(other.fit_index_, qc.fit_index_)


def test_clusterer_refuses_too_few_rows() -> None:
    X, _ = blobs(n_per=2)
    with pytest.raises(CreError, match="at least 10 prompts"):
        QueryClusterer().fit(X)
    with pytest.raises(CreError, match="NaN"):
        QueryClusterer().fit(np.full((20, 4), np.nan))


def test_reducer_resolves_small_inputs() -> None:
    X, _ = blobs(n_per=3, k=2)
    r = Reducer(n_components=8, seed=0).fit(X)
    assert r.n_neighbors_ == 5 and r.n_components_ == 4
    assert r.embedding_.shape == (6, 4)
    assert default_n_neighbors(480) == 15 and default_n_neighbors(100000) == 30


@pytest.mark.parametrize("method", ["knn", "centroid"])
def test_assigner_assigns_in_embedding_space(method: str) -> None:
    X, y = blobs()
    a = Assigner(method=method).fit(X, y)
    labels, dist = a.predict(X)
    np.testing.assert_array_equal(labels, y)
    assert a.centroids_.shape == (4, X.shape[1])
    np.testing.assert_allclose(np.linalg.norm(a.centroids_, axis=1), 1.0, rtol=1e-5)
    # A query pointing nowhere near the blobs is far from every cluster.
    far = np.zeros((1, X.shape[1]), dtype=np.float32)
    far[0, -1] = 1.0
    labels, dist = a.predict(far)
    assert labels[0] == -1 and dist[0] > a.threshold_
    assert 0 < a.threshold_ < 0.5


def test_assigner_ignores_noise_and_honours_max_distance() -> None:
    X, y = blobs()
    y = y.copy()
    y[:5] = -1
    a = Assigner(k=3).fit(X, y)
    assert len(a.exemplars_) == len(X) - 5 and (a.exemplar_labels_ >= 0).all()
    labels, _ = a.predict(X[:5])
    assert (labels == 0).all()  # noise rows of blob 0 land in blob 0
    strict = Assigner(max_distance=0.0).fit(X, y)
    assert strict.threshold_ == 0.0
    assert (strict.predict(X[:5])[0] == -1).all()


def test_assigner_knn_vote_beats_a_single_nearest_neighbour() -> None:
    X, y = blobs()
    y = y.copy()
    y[0] = 1  # one mislabelled member of blob 0
    labels, _ = Assigner(k=5, max_distance=2.0).fit(X, y).predict(X[:1] * 0.99 + X[1:2] * 0.01)
    assert labels[0] == 0


def test_assigner_state_roundtrip_without_pickle() -> None:
    X, y = blobs()
    a = Assigner(k=4).fit(X, y)
    params, arrays = a.state()
    assert all(arr.dtype != object for arr in arrays.values())
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    buf.seek(0)
    with np.load(buf, allow_pickle=False) as data:
        back = Assigner.from_state(json.loads(json.dumps(params)), {k: data[k] for k in data.files})
    queries = X + 0.05 * np.random.default_rng(2).normal(size=X.shape).astype(np.float32)
    for got, want in zip(back.predict(queries), a.predict(queries)):
        np.testing.assert_array_equal(got, want)
    assert back.threshold_ == a.threshold_
    np.testing.assert_array_equal(back.radius_, a.radius_)
    np.testing.assert_array_equal(back.reach_, a.reach_)


@pytest.mark.parametrize("method", ["knn", "centroid"])
def test_a_clusters_reach_is_its_farthest_members_leave_one_out_distance(method: str) -> None:
    # ...but never below the median cluster's: a templated cluster's members sit 0 apart.
    X, y = blobs()
    a = Assigner(method=method, k=3).fit(X, y)
    _, loo = assign.leave_one_out(a, a.exemplars_, a.exemplar_labels_)
    floor = np.median([loo[a.exemplar_labels_ == c].max() for c in a.classes_])
    for c in a.classes_:
        mine = loo[a.exemplar_labels_ == c]
        assert a.reach(int(c)) == pytest.approx(max(mine.max(), floor))
        assert a.radius(int(c)) == pytest.approx(np.quantile(mine, assign.RADIUS_QUANTILE))
        assert a.radius(int(c)) <= a.reach(int(c))  # type: ignore[operator]
    assert a.reach(-1) is None and a.reach(99) is None


def test_a_templated_clusters_reach_is_the_median_clusters() -> None:
    # Members that are copies of one template (0 apart) do not make a reach of 0.
    rng = np.random.default_rng(1)
    same = np.tile(rng.normal(size=(1, 8)), (6, 1))
    spread = [c + 0.3 * rng.normal(size=(6, 8)) for c in rng.normal(size=(2, 8))]
    X = np.vstack([same, *spread])
    y = np.repeat([0, 1, 2], 6)
    a = Assigner(k=3).fit(X, y)
    assert a.reach(0) == pytest.approx(float(np.median([a.reach(1), a.reach(2), a.reach(0)])))
    assert a.reach(0) > 0.01 and a.radius(0) < 0.01


def test_assigner_errors() -> None:
    X, y = blobs()
    with pytest.raises(CreError, match="every row is noise"):
        Assigner().fit(X, np.full(len(X), -1))
    with pytest.raises(CreError, match="not known"):
        Assigner(method="svm").fit(X, y)
    with pytest.raises(CreError, match="not fitted"):
        Assigner().predict(X)
    a = Assigner().fit(X, y)
    with pytest.raises(CreError, match="dimensions"):
        a.predict(X[:, :5])
    params, arrays = a.state()
    with pytest.raises(RouterFileError, match="inconsistent"):
        Assigner.from_state(params, dict(arrays, centroids=arrays["centroids"][:2]))
    with pytest.raises(RouterFileError, match="exemplars"):
        Assigner.from_state(params, {k: v for k, v in arrays.items() if k != "exemplars"})


def test_agreement_is_leave_one_out() -> None:
    X, y = blobs()
    y = y.copy()
    y[0] = 1  # a member of blob 0 labelled 1: only its own vote could make it agree
    a = Assigner(k=1, max_distance=2.0).fit(X, y)
    sims = X @ X.T
    np.fill_diagonal(sims, -np.inf)
    reference = float((y[sims.argmax(axis=1)] == y).mean())  # 1-NN among the other rows
    assert reference < 1.0
    assert agreement(a, X, y) == pytest.approx(reference)


def test_centroid_agreement_leaves_the_row_out_of_its_centroid() -> None:
    X, _ = blobs(n_per=3, k=2)
    # Row 0 (a blob-0 member) is the only member of cluster 1: its own centroid would be
    # itself; left out, that centroid is empty and blob 0's centroid wins.
    y = np.array([1, 0, 0, 2, 2, 2])
    a = Assigner(method="centroid", max_distance=2.0).fit(X, y)
    assert agreement(a, X, y) == pytest.approx(5 / 6)


def test_agreement_counts_far_rows_as_misses() -> None:
    X, y = blobs()
    a = Assigner(max_distance=0.0).fit(X, y)
    assert agreement(a, X, y) == 0.0


@pytest.mark.skipif(not QUERYLOG.is_file(), reason=f"{QUERYLOG} is not on this machine")
def test_route_time_assignment_agrees_with_hdbscan_on_the_real_log() -> None:
    from crecli.embed import TfidfEmbedder

    prompts = [json.loads(line)["prompt"] for line in QUERYLOG.open() if line.strip()]
    X = TfidfEmbedder(seed=0).fit(prompts).transform(prompts)
    qc = QueryClusterer(seed=0).fit(X)
    assert qc.n_clusters_ >= 8  # 16 tasks; a degenerate clustering would make the agreement trivial
    assert agreement(qc.assigner_, X[qc.fit_index_], qc.raw_labels_) >= 0.90


def test_a_fit_with_more_clustered_rows_than_a_router_holds_stops_before_writing_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(assign, "MAX_EXEMPLARS", 3)
    X = np.eye(4, dtype=np.float32)
    with pytest.raises(CreError, match="more than a router holds"):
        Assigner().fit(X, np.array([0, 0, 1, 1]))
    Assigner().fit(X, np.array([0, 0, 1, -1]))  # noise rows are not kept


def test_similarity_blocks_are_thinner_the_more_exemplars_there_are() -> None:
    rows = list(assign._chunks(5000, 1 << 22))
    assert len(rows) == 5000 // 16 + (5000 % 16 > 0) and rows[0] == slice(0, 16)  # 16 x 4M floats: 256 MiB
    assert list(assign._chunks(5000, 10)) == [slice(0, 1024), slice(1024, 2048), slice(2048, 3072),
                                              slice(3072, 4096), slice(4096, 5000)]
