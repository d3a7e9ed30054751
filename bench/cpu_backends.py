#!/usr/bin/env python3
"""Compare llama.cpp CPU configurations side by side, in one run, on this machine.

Why: on Xeons with AMX a native llama.cpp build segfaults (or dies of SIGILL) at the first
decode when weights go into its AMX "extra buffer type". cre's fix is to turn extra buffer
types off on AMX CPUs (`use_extra_bufts = False`). That also turns off llama.cpp's CPU
"repack" layouts, which may cost speed. This bench measures, per model:

- this install with extra buffer types off (what cre does on AMX CPUs);
- this install with them on (what cre does elsewhere; a crash is reported, not fatal);
- optionally another llama-cpp-python build (`--alt DIR`, a `pip install --target DIR`
  of, say, a `-DGGML_NATIVE=OFF` wheel), with extra buffer types on and off.

Each configuration runs in its own child process, one after another (never two at once:
llama.cpp's threads spin), with `cre models bench`'s own measurement (median of
`--repeats` runs). It prints tokens/s and each configuration's ratio to the first one.

- optionally the same model re-quantized to other weight types (`--requant Q8_0 Q4_0 F16`,
  with llama.cpp's own `llama_model_quantize` into a temporary folder, extra buffer types
  off), which shows whether a model's prompt speed is bound by its weights' kernels;
- optionally (`--lengths 4 16 64 256`) what a prompt of each length costs after the
  model's cached head, as real prompts do, in milliseconds and as a ratio to the ladder's
  top rung: the token rates above are measured at one length.

    python bench/cpu_backends.py                       # the whole ladder
    python bench/cpu_backends.py qwen2.5-coder-0.5b-instruct --alt /tmp/nonnative
    python bench/cpu_backends.py qwen2.5-coder-0.5b-instruct --requant Q8_0 Q4_0 F16 BF16
    python bench/cpu_backends.py --lengths 4 16 32 64 128 256
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile

CHILD = r"""
import dataclasses, json, sys
from crecli import config
from crecli.models import bench
import llama_cpp
spec = config.load().get(sys.argv[1])
if len(sys.argv) > 5:  # another file for this model (a re-quantized copy): nothing to verify
    spec = dataclasses.replace(spec, path=sys.argv[5], chunks=(), sha256=None, size=None)
speed = bench.measure(spec, pp_tokens=int(sys.argv[2]), tg_tokens=int(sys.argv[3]), repeats=int(sys.argv[4]))
info = llama_cpp.llama_print_system_info().decode(errors="replace")
print(json.dumps({"mean_pp": speed.mean_pp, "pass_seconds": speed.pass_seconds, "tg": speed.tg_tokens_per_s,
                  "pp_spread": speed.pp_spread, "tg_spread": speed.tg_spread,
                  "amx_build": "AMX_INT8 = 1" in info, "llama_cpp": llama_cpp.__file__}))
"""

# Milliseconds to decode n new prompt tokens after the model's cached head, per n.
LENGTHS_CHILD = r"""
import json, statistics, sys, time
from crecli import config
from crecli.models.bench import _PROMPT
from crecli.models.llama import LlamaBackend
from crecli.models.tokens import prompt_head
spec = config.load().get(sys.argv[1])
llm = LlamaBackend(spec).llm
first = prompt_head(llm, spec.prompt_format)
head = len(first)
body = llm.tokenize((_PROMPT * 64).encode(), add_bos=False)
llm.reset()
llm.eval(first)
times = {}
for _ in range(int(sys.argv[3])):
    for n in json.loads(sys.argv[2]):
        llm.n_tokens = head  # as if the previous prompt had shared only the head
        start = time.perf_counter()
        llm.eval(body[:n])
        times.setdefault(n, []).append(time.perf_counter() - start)
print(json.dumps({"head": head, "ms": {n: 1000 * statistics.median(v) for n, v in times.items()}}))
"""

FTYPES = {"Q8_0": 7, "Q4_0": 2, "F16": 1, "BF16": 32}


def requantize(source: str, ftype: str, folder: str) -> str:
    """`source` re-quantized to `ftype` by llama.cpp (from its already quantized weights)."""
    import llama_cpp

    target = os.path.join(folder, f"{ftype}.gguf")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = FTYPES[ftype]
    params.allow_requantize = True
    if llama_cpp.llama_model_quantize(source.encode(), target.encode(), params) != 0:
        sys.exit(f"llama.cpp could not quantize {source} to {ftype}")
    return target


def lengths(models: list[str], args: argparse.Namespace) -> None:
    rows = {}
    for model in models:
        print(f"{model}: prompt lengths...", file=sys.stderr, flush=True)
        proc = subprocess.run([sys.executable, "-c", LENGTHS_CHILD, model, json.dumps(args.lengths), str(args.repeats)],
                              capture_output=True, text=True, env=dict(os.environ), timeout=900)
        if proc.returncode != 0:
            sys.exit(f"{model}: {(proc.stderr.strip().splitlines() or ['exit %d' % proc.returncode])[-1]}")
        rows[model] = json.loads(proc.stdout.strip().splitlines()[-1])
    top = models[-1]
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"milliseconds to process n new prompt tokens after the cached head (ratio to {top})")
    print(f"{'model':30} {'head':>5} " + " ".join(f"{'n=' + str(n):>14}" for n in args.lengths))
    for model, row in rows.items():
        cells = [f"{row['ms'][str(n)]:7.0f} ({row['ms'][str(n)] / rows[top]['ms'][str(n)]:.2f})" for n in args.lengths]
        print(f"{model:30} {row['head']:5d} " + " ".join(f"{c:>14}" for c in cells))


def run_one(model: str, extra: bool, alt: str | None, args: argparse.Namespace, path: str | None = None) -> dict:
    env = dict(os.environ, CRE_LLAMA_EXTRA_BUFTS="1" if extra else "0")
    if alt:
        env["PYTHONPATH"] = alt + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, model, str(args.pp_tokens), str(args.tg_tokens), str(args.repeats), *([path] if path else [])],
        capture_output=True, text=True, env=env, timeout=900,
    )
    if proc.returncode < 0:
        return {"crash": signal.Signals(-proc.returncode).name}
    if proc.returncode != 0:
        return {"crash": (proc.stderr.strip().splitlines() or ["exit %d" % proc.returncode])[-1][:120]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="*", help="models (default: the ladder's local models)")
    parser.add_argument("--alt", help="a directory holding another llama_cpp build (pip install --target)")
    parser.add_argument("--alt-name", default="alternative build")
    parser.add_argument("--pp-tokens", type=int, default=256)
    parser.add_argument("--tg-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--requant", nargs="+", choices=sorted(FTYPES), default=[],
                        help="also measure the model re-quantized to these weight types")
    parser.add_argument("--lengths", nargs="+", type=int,
                        help="instead: milliseconds per prompt of these many new tokens, per model")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    from crecli import config

    settings = config.load()
    models = args.models or [n for n in settings.ladder if settings.get(n).backend == "llama"]
    if args.lengths:
        lengths(models, args)
        return
    configs: list[tuple[str, bool, str | None, str | None]] = [
        ("this build, extra bufts off", False, None, None), ("this build, extra bufts on", True, None, None)]
    if args.alt:
        configs += [(f"{args.alt_name}, extra bufts on", True, args.alt, None),
                    (f"{args.alt_name}, extra bufts off", False, args.alt, None)]
    results = []
    for model in models:
        base = None
        with tempfile.TemporaryDirectory(prefix="cre-requant-") as folder:
            for ftype in args.requant:
                print(f"{model}: re-quantizing to {ftype}...", file=sys.stderr, flush=True)
                configs.append((f"re-quantized to {ftype}, extra bufts off", False, None,
                                requantize(str(settings.get(model).file), ftype, folder)))
            for name, extra, alt, path in configs:
                print(f"{model}: {name}...", file=sys.stderr, flush=True)
                r = run_one(model, extra, alt, args, path)
                r.update(model=model, config=name)
                if base is None and "crash" not in r:
                    base = r
                if base is not None and "crash" not in r:
                    r["tg_ratio"] = r["tg"] / base["tg"]
                    r["pp_ratio"] = r["pp"] / base["pp"]
                results.append(r)
            del configs[len(configs) - len(args.requant):]
    if args.json:
        print(json.dumps(results, indent=2))
        return
    print(f"{'model':30} {'configuration':36} {'gen tok/s':>10} {'ratio':>6} {'prompt tok/s':>13} {'ratio':>6}  spread")
    for r in results:
        if "crash" in r:
            print(f"{r['model']:30} {r['config']:36} {'crashed: ' + r['crash']}")
            continue
        print(
            f"{r['model']:30} {r['config']:36} {r['tg']:10.1f} {r.get('tg_ratio', 1):6.2f} "
            f"{r['pp']:13.0f} {r.get('pp_ratio', 1):6.2f}  {max(r['pp_spread'], r['tg_spread']):.0%}"
        )


if __name__ == "__main__":
    main()
