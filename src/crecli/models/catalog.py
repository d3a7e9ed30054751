"""What `cre models list` reports: one row per model, from config, disk and bench figures.

`signals` says whether a model's greedy answers carry confidence signals
(`registry.signal_support`): "logprobs" for llama.cpp, and for a remote rung whatever a
one-token probe of its server found ("logprobs", "none", or "unknown (not reached)")."""

from __future__ import annotations

from typing import Any

from crecli.config import ModelConfig
from crecli.models import bench, registry
from crecli.models.pull import file_state, fix_for


def _placement(spec: Any) -> str:
    from crecli.models.gguf import placement

    return placement(spec)


def rows(settings: ModelConfig, deep: bool = False) -> list[dict[str, Any]]:
    out = []
    for name, spec in settings.models.items():
        state = file_state(spec, deep=deep)
        speed = bench.stored(spec)
        # What needs doing: a ladder model or a file present but not verified, or a `path`
        # model's missing file. A model off the ladder that a pull fetches and that was
        # never pulled is an option, not a fault (the shipped 0.5B's Q4_0).
        needs = not state.verified and (name in settings.ladder or state.present or not spec.pullable)
        out.append(
            {
                "name": name,
                "on_ladder": name in settings.ladder,
                "rung": settings.ladder.index(name) if name in settings.ladder else None,
                "backend": spec.backend,
                "arch": spec.arch,
                "params": spec.params,
                "quant": spec.quant,
                "size": spec.size if spec.size is not None else state.size,
                "path": str(spec.file) if spec.file else spec.url,
                "present": state.present,
                "verified": state.verified,
                "problem": "" if state.verified else state.reason,
                # Whether `cre models pull` fetches it, and what to do while it is not verified:
                # a `path` model is the user's file, which a pull cannot fetch.
                "pullable": spec.pullable,
                # The model a pull makes this one from, by llama.cpp's quantizer (`quant`).
                "requantize_from": spec.requantize_from,
                "fix": fix_for(spec) if needs else "",
                "sha256": spec.sha256,
                # A file with no sha256 pinned is "verified" as a GGUF file only: shown as
                # unpinned, not as a checked file (`render.models_table`).
                "pinned": spec.sha256 is not None,
                "prompt_format": spec.prompt_format,
                "context": spec.context,
                "n_gpu_layers": spec.n_gpu_layers,
                "runs_on": "remote" if spec.backend == "openai" else _placement(spec),
                "signals": registry.signal_support(spec, quick=True),
                "pp_tokens_per_s": speed["pp_tokens_per_s"] if speed else None,
                "tg_tokens_per_s": speed["tg_tokens_per_s"] if speed else None,
                "pass_seconds": bench.pass_of(speed) if speed else None,
            }
        )
    out.sort(key=lambda r: (r["rung"] is None, r["rung"] if r["rung"] is not None else 0, r["name"]))
    return out
