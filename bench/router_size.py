"""A router file's size and load time, and what storing its arrays compactly changes.

A router file stores the TF-IDF SVD's components as int8 with a scale per component
(`tfidf.quantize`) and the assigner's exemplars as float16. This bench fits the embedder
and clusters on a log twice, side by side in one run: once as `cre fit` does, once with
float32 components and exemplars (the format before), and prints:

  size      the zipped arrays of each, and the whole router file when one is given;
  changes   how many of the log's prompts, and of the same prompts with a fifth of their
            words dropped (prompts near, not on, the log), the assigner puts in another
            cluster or calls far (-1), and the largest change of any embedding coordinate;
  clusters  with --cluster, UMAP + HDBSCAN run on each embedding: NMI and ARI between the
            two clusterings, and each against the log's task labels (slow: two UMAP fits);
  load      with --router FILE: `routerfile.load` of that file in this process (median of
            --repeats), and a fresh `python -c` that imports crecli and loads it.

The assigner is fitted on the log's task labels (meta.source) unless --cluster is given,
so the assignment check does not depend on UMAP.

    .venv/bin/python bench/router_size.py [--log examples/querylog-large.jsonl] [--router R] [--cluster] [--json]
"""

from __future__ import annotations

import argparse
import io
import json
import random
import statistics
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def zipped(arrays: dict[str, Any]) -> int:
    import numpy as np

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, array in arrays.items():
            data = io.BytesIO()
            np.save(data, array, allow_pickle=False)
            zf.writestr(name, data.getvalue())
    return len(buf.getvalue())


def fitted(prompts: list[str], labels: Any, compact: bool) -> tuple[Any, Any]:
    """(embedder, assigner) as `cre fit` makes them, or with float32 arrays (`compact` False)."""
    import numpy as np

    from crecli import assign, tfidf

    saved = tfidf.quantize, tfidf.dequantize, assign.stored_rows
    if not compact:
        tfidf.quantize = lambda rows: (np.asarray(rows, dtype=np.float32), np.ones(len(rows), dtype=np.float32))  # type: ignore[assignment]
        tfidf.dequantize = lambda codes, scale: np.asarray(codes, dtype=np.float32)  # type: ignore[assignment]
        assign.stored_rows = lambda X: np.asarray(X, dtype=np.float32)  # type: ignore[assignment]
    try:
        emb = tfidf.TfidfEmbedder().fit(prompts)
        assigner = assign.Assigner().fit(emb.transform(prompts), labels)
    finally:
        tfidf.quantize, tfidf.dequantize, assign.stored_rows = saved
    return emb, assigner


def perturbed(prompts: list[str], seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = []
    for p in prompts:
        words = p.split()
        for _ in range(max(1, len(words) // 5)):
            if len(words) > 2:
                words.pop(rng.randrange(len(words)))
        out.append(" ".join(words))
    return out


def load_times(router: Path, repeats: int) -> dict[str, float]:
    from crecli import config, routerfile

    settings = config.load()
    routerfile.load(router, settings)  # warm imports and the page cache
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        routerfile.load(router, settings)
        times.append(time.perf_counter() - start)
    code = ("import time; t = time.perf_counter(); from crecli import config, routerfile; "
            f"routerfile.load(__import__('pathlib').Path({str(router)!r}), config.load()); "
            "print(time.perf_counter() - t)")
    fresh = [float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
             for _ in range(3)]
    return {"load_s": statistics.median(times), "fresh_process_import_and_load_s": statistics.median(fresh)}


def main() -> None:
    import numpy as np

    from crecli import querylog

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--log", type=Path, default=ROOT / "examples" / "querylog-large.jsonl")
    parser.add_argument("--router", type=Path, help="a router file to size and time loading")
    parser.add_argument("--cluster", action="store_true", help="also compare UMAP + HDBSCAN clusterings (slow)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    records = querylog.LogOptions().read(args.log).records
    prompts = [r.prompt for r in records]
    tasks = [str(r.meta.get("source")) for r in records]
    names = sorted(set(tasks))
    labels = np.array([names.index(t) for t in tasks])
    result: dict[str, Any] = {"log": str(args.log), "prompts": len(prompts)}

    if args.cluster:
        from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

        from crecli import cluster

        found = {}
        for compact in (False, True):
            emb, _ = fitted(prompts, labels, compact)
            found[compact] = cluster.QueryClusterer(seed=0).fit(emb.transform(prompts)).labels_
        result["clusters"] = {
            "nmi_between": float(normalized_mutual_info_score(found[False], found[True])),
            "ari_between": float(adjusted_rand_score(found[False], found[True])),
            "nmi_vs_tasks": {k: float(normalized_mutual_info_score(tasks, v)) for k, v in (("float32", found[False]), ("compact", found[True]))},
            "n_clusters": {k: int(len(set(v) - {-1})) for k, v in (("float32", found[False]), ("compact", found[True]))},
        }

    (e32, a32), (e8, a8) = fitted(prompts, labels, False), fitted(prompts, labels, True)
    near = perturbed(prompts)
    changes = {}
    for name, texts in (("log", prompts), ("perturbed", near)):
        l32, _ = a32.predict(e32.transform(texts))
        l8, _ = a8.predict(e8.transform(texts))
        changes[name] = int((l32 != l8).sum())
    result["changes"] = {**changes, "max_coordinate_change": float(np.abs(e32.transform(prompts) - e8.transform(prompts)).max())}
    result["zipped_bytes"] = {
        "float32": zipped({**{k: v for k, v in e32.state()[1].items() if not k.startswith("components")},
                           "components": e32.components_, **a32.state()[1], "exemplars": a32.exemplars_}),
        "compact": zipped({**e8.state()[1], **a8.state()[1]}),
    }
    if args.router:
        with zipfile.ZipFile(args.router) as zf:
            result["router"] = {"path": str(args.router), "bytes": args.router.stat().st_size,
                                "members": {i.filename: [i.compress_size, i.file_size] for i in zf.infolist()},
                                **load_times(args.router, args.repeats)}
    if args.json:
        print(json.dumps(result, indent=1))
        return
    z = result["zipped_bytes"]
    print(f"{len(prompts)} prompts; arrays zipped: float32 {z['float32'] / 1e6:.2f} MB, compact {z['compact'] / 1e6:.2f} MB")
    c = result["changes"]
    print(f"assignments changed: {c['log']} of the log's prompts, {c['perturbed']} of the perturbed ones; "
          f"largest embedding change {c['max_coordinate_change']:.4f}")
    if "clusters" in result:
        k = result["clusters"]
        print(f"clusters: NMI {k['nmi_between']:.3f}, ARI {k['ari_between']:.3f} between the two; "
              f"NMI vs tasks {k['nmi_vs_tasks']}; clusters {k['n_clusters']}")
    if "router" in result:
        r = result["router"]
        print(f"{r['path']}: {r['bytes'] / 1e6:.2f} MB; load {r['load_s'] * 1000:.0f} ms in process, "
              f"{r['fresh_process_import_and_load_s'] * 1000:.0f} ms with imports in a fresh process")


if __name__ == "__main__":
    main()
