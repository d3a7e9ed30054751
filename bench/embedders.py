"""Choose the default embedder (and clustering defaults) by measurement.

For each candidate embedder: embed the log's prompts, cluster them with QueryClusterer
(seed 0), and score the final clusters against the log's task labels (meta.source) with
NMI and ARI; rows left unclustered (-1) each count as their own singleton label, so noise
is never rewarded. Also reported: clusters found, the unclustered share, the leave-one-out
agreement of the route-time Assigner with HDBSCAN, and wall time of embedding and
clustering.

    .venv/bin/python bench/embedders.py                      # tfidf candidates
    flock /tmp/cre-cpu.lock .venv/bin/python bench/embedders.py --llama   # + llama.cpp embeddings
    .venv/bin/python bench/embedders.py --grid --only tfidf-wc-256-mindf2-maskdigits  # tune HDBSCAN
    .venv/bin/python bench/embedders.py --grid --sample 240 --mcs auto,5,8,11,15 --ms auto

crecli's default embedder (TfidfEmbedder()) is the candidate tfidf-wc-256-mindf2-maskdigits.

llama.cpp candidates run only with --llama and only for models whose GGUF is present and
verified; run them under `flock /tmp/cre-cpu.lock` so no two model computations overlap.
Their vectors are computed fresh (cache=False) so the embed time is honest; --cache reads
and fills crecli's embedding cache instead, and marks llama embed times with "c" (near
zero once the cache is warm, a true cost on a cold cache).

--holdout adds route-time columns: fit the embedder and the clusters on a seeded half of
the log, assign the other half with the Assigner, and report the share judged far from
every cluster (ho_far) and the share put in a cluster whose majority task is the prompt's
own (ho_task).

In --grid mode, UMAP's output is memoised per (embedding, UMAP settings): it does not
depend on the HDBSCAN settings being swept, and recomputing it would only add noise.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_LOG = Path(__file__).resolve().parents[1] / "examples" / "querylog.jsonl"


def read_prompts(path: Path) -> tuple[list[str], list[str]]:
    prompts, sources = [], []
    with path.open() as fh:
        for line in fh:
            if line.strip():
                row = json.loads(line)
                prompts.append(row["prompt"])
                sources.append(row.get("meta", {}).get("source", "?"))
    return prompts, sources


def candidates(settings: Any, llama: bool) -> dict[str, Callable[[], Any]]:
    from crecli.embed import LlamaEmbedder, TfidfEmbedder
    from crecli.models.pull import file_state

    out: dict[str, Callable[[], Any]] = {}
    for mask in (False, True):
        for analyzer, tag in (("word", "w"), ("word+char", "wc")):
            for dims in (128, 256):
                name = f"tfidf-{tag}-{dims}" + ("-maskdigits" if mask else "")
                out[name] = lambda a=analyzer, d=dims, m=mask: TfidfEmbedder(
                    dims=d, analyzer=a, min_df=1, mask_digits=m, seed=0)
        name = "tfidf-wc-256-mindf2" + ("-maskdigits" if mask else "")
        out[name] = lambda m=mask: TfidfEmbedder(dims=256, analyzer="word+char", min_df=2, mask_digits=m, seed=0)
    if llama:
        for name in ("gemma-3-270m", "qwen2.5-coder-0.5b-instruct"):
            if name in settings.models and file_state(settings.get(name)).verified:
                out[f"llama-{name}"] = lambda n=name: LlamaEmbedder(n, settings)
            else:
                print(f"skipping llama-{name}: GGUF not present and verified", file=sys.stderr)
    return out


def memoise_umap() -> None:
    from crecli import reduce

    memo: dict[tuple[Any, ...], Any] = {}
    original = reduce.Reducer.fit

    def fit(self: Any, X: Any) -> Any:
        import numpy as np

        X = np.ascontiguousarray(X, dtype=np.float32)
        key = (hashlib.sha256(X.tobytes()).hexdigest(), X.shape, self.n_components, self.n_neighbors,
               self.min_dist, self.seed)
        if key not in memo:
            memo[key] = original(self, X)
        done = memo[key]
        self.embedding_, self.n_neighbors_, self.n_components_ = done.embedding_, done.n_neighbors_, done.n_components_
        return self

    reduce.Reducer.fit = fit  # type: ignore[method-assign]


def score(X: Any, sources: list[str], **params: Any) -> dict[str, Any]:
    import numpy as np
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    from crecli.cluster import QueryClusterer, agreement

    start = time.perf_counter()
    qc = QueryClusterer(seed=0, **params).fit(X)
    seconds = time.perf_counter() - start
    labels = qc.labels_.copy()
    unclustered = labels < 0
    labels[unclustered] = labels.max() + 1 + np.arange(unclustered.sum())
    return {
        "nmi": normalized_mutual_info_score(sources, labels),
        "ari": adjusted_rand_score(sources, labels),
        "clusters": qc.n_clusters_,
        "hdbscan_noise": float((qc.raw_labels_ < 0).mean()),
        "unclustered": float(unclustered.mean()),
        "agreement": agreement(qc.assigner_, X[qc.fit_index_], qc.raw_labels_),
        "cluster_s": seconds,
        "mcs": qc.min_cluster_size_,
        "ms": qc.min_samples_,
        "nn": qc.n_neighbors_,
    }


def holdout(make: Callable[[], Any], X: Any, prompts: list[str], sources: list[str]) -> dict[str, float]:
    import numpy as np
    from collections import Counter

    from crecli.cluster import QueryClusterer
    from crecli.embed import TfidfEmbedder

    perm = np.random.default_rng(0).permutation(len(prompts))
    train, test = np.sort(perm[: len(perm) // 2]), np.sort(perm[len(perm) // 2:])
    emb = make()
    if isinstance(emb, TfidfEmbedder):  # fitted on the log: refit on the training half only
        emb.fit([prompts[i] for i in train])
        X_train, X_test = emb.transform([prompts[i] for i in train]), emb.transform([prompts[i] for i in test])
    else:
        X_train, X_test = X[train], X[test]
    qc = QueryClusterer(seed=0).fit(X_train)
    src = np.array(sources)
    majority = {c: Counter(src[train][qc.labels_ == c]).most_common(1)[0][0] for c in set(qc.labels_.tolist()) if c >= 0}
    labels, _ = qc.assigner_.predict(X_test)
    return {
        "ho_far": float((labels < 0).mean()),
        "ho_task": float(np.mean([lab >= 0 and majority[lab] == s for lab, s in zip(labels, src[test])])),
    }


def embed(make: Callable[[], Any], prompts: list[str], cache: bool) -> tuple[Any, float]:
    from crecli.embed import embed_texts

    start = time.perf_counter()
    emb = make().fit(prompts)
    X = embed_texts(emb, prompts, cache=cache)
    seconds = time.perf_counter() - start
    emb.close()
    return X, seconds


def ints(text: str) -> list[int | None]:
    return [None if v in ("", "auto") else int(v) for v in text.split(",")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--log", type=Path, default=DEFAULT_LOG)
    ap.add_argument("--llama", action="store_true", help="also llama.cpp embedding candidates")
    ap.add_argument("--only", default="", help="comma-separated candidate names")
    ap.add_argument("--sample", type=int, default=0, help="score a seeded random sample of this many rows")
    ap.add_argument("--cache", action="store_true", help="read/fill crecli's embedding cache")
    ap.add_argument("--grid", action="store_true", help="sweep HDBSCAN/UMAP settings per candidate")
    ap.add_argument("--holdout", action="store_true", help="also score route-time assignment on a held-out half")
    ap.add_argument("--mcs", type=ints, default=ints("auto,5,8,11,15,20,30"), help="min_cluster_size values")
    ap.add_argument("--ms", type=ints, default=ints("auto,1,2,5,10"), help="min_samples values")
    ap.add_argument("--nn", type=ints, default=ints("auto"), help="n_neighbors values")
    args = ap.parse_args()

    from crecli import config

    prompts, sources = read_prompts(args.log)
    if args.sample:
        import numpy as np

        keep = np.sort(np.random.default_rng(0).choice(len(prompts), size=args.sample, replace=False))
        prompts, sources = [prompts[i] for i in keep], [sources[i] for i in keep]
    print(f"{args.log}: {len(prompts)} prompts, {len(set(sources))} tasks", file=sys.stderr)
    cands = candidates(config.load(), args.llama)
    if args.only:
        wanted = args.only.split(",")
        cands = {k: v for k, v in cands.items() if k in wanted}
    if args.grid:
        memoise_umap()
        settings = [{"n_neighbors": nn, "min_cluster_size": mcs, "min_samples": ms}
                    for nn in args.nn for mcs in args.mcs for ms in args.ms]
    else:
        settings = [{}]

    head = f"{'candidate':<34} {'NMI':>6} {'ARI':>6} {'n_clusters':>10} {'noise':>6} {'unclust':>7} {'agree':>6} " \
           f"{'embed s':>8} {'cluster s':>9}  nn/mcs/ms" + ("  ho_far ho_task" if args.holdout else "")
    print(head)
    print("-" * len(head))
    for name, make in cands.items():
        X, embed_s = embed(make, prompts, args.cache)
        for params in settings:
            r = score(X, sources, **params)
            cached = "c" if args.cache and name.startswith("llama") else ""
            print(f"{name:<34} {r['nmi']:6.3f} {r['ari']:6.3f} {r['clusters']:10d} {r['hdbscan_noise']:6.3f} "
                  f"{r['unclustered']:7.3f} {r['agreement']:6.3f} {embed_s:7.1f}{cached or ' '} {r['cluster_s']:9.1f}  "
                  f"{r['nn']}/{r['mcs']}/{r['ms']:<3}", end="")
            if args.holdout:
                h = holdout(make, X, prompts, sources)
                print(f"  {h['ho_far']:6.3f} {h['ho_task']:7.3f}", end="")
            print(flush=True)
    print("noise = HDBSCAN's noise share; unclust = share left -1 after noise handling; agree = leave-one-out "
          "Assigner agreement with HDBSCAN; c = embedded with the cache enabled", file=sys.stderr)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "src"))
    main()
