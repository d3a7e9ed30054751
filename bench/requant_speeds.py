#!/usr/bin/env python3
"""Would another quantization make a small rung cheaper against the top one?

On this ladder a small rung pays only where it is right more often than its cost share of
the top rung (docs/results.md, "What limits it"), and the 0.5B's share is high: its prompt
speed is well under three times the 1.5B's, though it has a third of the parameters. Its
Q4_K_M file is mostly Q5_0, llama.cpp's fallback where a row (896 wide) does not divide into
Q4_K's 256-value blocks, so its kernels may be what is slow.

This bench requantizes each named model's pinned file (`models.pull.requantize`, which
`requantize_from` models are made by: llama.cpp's own quantizer, from the shipped file, the
only weights here) to each type asked for, into a temporary folder, then times the originals and the new files in
interleaved rounds (`bench.measure_all`, one model loaded at a time) and prints each file's
prompt and generation speed, its ratio to the original's, and the cost of a typical query
(`speed_ratios.shares`: the log's mean new prompt and output tokens) as a share of the top
rung's original. Accuracy is not measured here: a requantized file answers differently, and
its answers are recorded by a fit (docs/results.md, "A requantized small rung"). Nothing else may run meanwhile.

    .venv/bin/python bench/requant_speeds.py                           # the 0.5B: q8_0, q4_0
    .venv/bin/python bench/requant_speeds.py --models gemma-3-270m qwen2.5-coder-0.5b-instruct --types q8_0 --json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from speed_ratios import shares  # noqa: E402

from crecli import config  # noqa: E402
from crecli.config import REQUANT_TYPES  # noqa: E402
from crecli.models import bench, pull  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=["qwen2.5-coder-0.5b-instruct"], help="ladder models to requantize")
    ap.add_argument("--types", nargs="+", default=["q8_0", "q4_0"], choices=sorted(t.lower() for t in REQUANT_TYPES))
    ap.add_argument("--repeats", type=int, default=bench.REPEATS, help="interleaved rounds")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    settings = config.load()
    ladder = [settings.get(m) for m in settings.ladder if settings.get(m).backend == "llama"]
    top = ladder[-1]
    for name in args.models:
        if name not in {s.name for s in ladder}:
            raise SystemExit(f"{name!r} is not an in-process rung of the ladder ({', '.join(s.name for s in ladder)})")
    with tempfile.TemporaryDirectory(prefix="cre-requant-") as tmp:
        variants: list[tuple[str, str, config.ModelSpec]] = []  # (model, type, spec)
        for name in args.models:
            spec = settings.get(name)
            assert spec.file is not None
            variants.append((name, "shipped", spec))
            for kind in args.types:
                target = Path(tmp) / f"{name}-{kind}.gguf"
                print(f"requantizing {name} to {kind}...", file=sys.stderr, flush=True)
                pull.requantize(spec.file, target, kind.upper())
                variants.append((name, kind, dataclasses.replace(
                    spec, name=f"{name}-{kind}", quant=kind.upper(), path=str(target), chunks=(), sha256=None, size=None)))
        specs = [v[2] for v in variants]
        if top.name not in args.models:
            specs.append(top)
        speeds = bench.measure_all(specs, repeats=args.repeats, progress=lambda m: print(m, file=sys.stderr, flush=True))
    by_spec = dict(zip((s.name for s in specs), speeds))
    reference = by_spec[top.name]
    rows = []
    for name, kind, spec in variants:
        speed, shipped = by_spec[spec.name], by_spec[name]
        rows.append({
            "model": name, "type": kind,
            # Over a whole prompt, pass included: not bench.json's rate after the pass.
            "mean_pp_tokens_per_s": round(speed.mean_pp, 1), "pass_seconds": round(speed.pass_seconds, 4),
            "tg_tokens_per_s": round(speed.tg_tokens_per_s, 1),
            "pp_vs_shipped": round(speed.mean_pp / shipped.mean_pp, 3),
            "tg_vs_shipped": round(speed.tg_tokens_per_s / shipped.tg_tokens_per_s, 3),
            "share_of_top": round(shares([speed, reference])[0], 3),
        })
    if args.json:
        print(json.dumps({"top": top.name, "repeats": args.repeats, "rows": rows}, indent=2))
        return
    print(f"a typical query's cost as a share of {top.name}'s (shipped), and speeds against the shipped file")
    for r in rows:
        print(f"  {r['model']:30} {r['type']:8} pp {r['mean_pp_tokens_per_s']:6.1f} tok/s (x{r['pp_vs_shipped']:.2f})  "
              f"tg {r['tg_tokens_per_s']:5.1f} tok/s (x{r['tg_vs_shipped']:.2f})  share {r['share_of_top']:.1%}")


if __name__ == "__main__":
    main()
