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

    python bench/cpu_backends.py                       # the whole ladder
    python bench/cpu_backends.py qwen2.5-coder-0.5b-instruct --alt /tmp/nonnative
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys

CHILD = r"""
import json, sys
from crecli import config
from crecli.models import bench
import llama_cpp
spec = config.load().get(sys.argv[1])
speed = bench.measure(spec, pp_tokens=int(sys.argv[2]), tg_tokens=int(sys.argv[3]), repeats=int(sys.argv[4]))
info = llama_cpp.llama_print_system_info().decode(errors="replace")
print(json.dumps({"pp": speed.pp_tokens_per_s, "tg": speed.tg_tokens_per_s,
                  "pp_spread": speed.pp_spread, "tg_spread": speed.tg_spread,
                  "amx_build": "AMX_INT8 = 1" in info, "llama_cpp": llama_cpp.__file__}))
"""


def run_one(model: str, extra: bool, alt: str | None, args: argparse.Namespace) -> dict:
    env = dict(os.environ, CRE_LLAMA_EXTRA_BUFTS="1" if extra else "0")
    if alt:
        env["PYTHONPATH"] = alt + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, model, str(args.pp_tokens), str(args.tg_tokens), str(args.repeats)],
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
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    from crecli import config

    settings = config.load()
    models = args.models or [n for n in settings.ladder if settings.get(n).backend == "llama"]
    configs = [("this build, extra bufts off", False, None), ("this build, extra bufts on", True, None)]
    if args.alt:
        configs += [(f"{args.alt_name}, extra bufts on", True, args.alt), (f"{args.alt_name}, extra bufts off", False, args.alt)]
    results = []
    for model in models:
        base = None
        for name, extra, alt in configs:
            print(f"{model}: {name}...", file=sys.stderr, flush=True)
            r = run_one(model, extra, alt, args)
            r.update(model=model, config=name)
            if base is None and "crash" not in r:
                base = r
            if base is not None and "crash" not in r:
                r["tg_ratio"] = r["tg"] / base["tg"]
                r["pp_ratio"] = r["pp"] / base["pp"]
            results.append(r)
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
