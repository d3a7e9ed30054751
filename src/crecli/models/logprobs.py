"""A remote rung's confidence signals, read from the log-probabilities its server returns.

The llama.cpp backend reads `Signals` from each greedy step's logits (`tokens.SignalMeter`):
the log-probability of the step's most likely token, and the option-letter margin at the
first step whose most likely token is a letter. An OpenAI-compatible server asked for
log-probabilities (`logprobs: true, top_logprobs: N` on chat completions, `logprobs: N` on
completions) returns, per generated token, the chosen token's log-probability and the N most
likely tokens'. Greedy decoding chooses the most likely token, so the same two signals come
from the top list: its best entry is the step's argmax, and the letters among its entries
give the margin (`tokens.letter_margin`, renormalised over the letters the server listed:
a letter outside the top N weighs almost nothing).

Three reply shapes are read:
- chat, and llama.cpp's server on both endpoints: `{"content": [{"token", "logprob",
  "top_logprobs": [{"token", "logprob"}, ...]}, ...]}`;
- completions, OpenAI's and vLLM's: `{"tokens": [...], "token_logprobs": [...],
  "top_logprobs": [{token: logprob, ...}, ...]}`.
A reply without them (Ollama's OpenAI endpoint drops them), or with any value that is not a
finite number at most 0 (a log-probability above 0 is a probability above 1; a server's
rounding, `ROUNDING` above it, reads as 0), or of the wrong type anywhere in these shapes,
gives None: no signals, never made-up ones, and never an error. Only a top list left out
(`null`, as vLLM sends for a token it has none for) reads as empty, and only an alternative
at -Infinity (a token the sampler ruled out, which Python servers whose JSON allows it send)
is left out of its top list: a probability of 0 says something, not that the reply is bad.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

from crecli.models.backend import Signals
from crecli.models.tokens import letter_index, letter_margin, summarize
from crecli.safejson import finite

# Alternatives asked for per token: vLLM's default --max-logprobs and OpenAI's chat maximum.
TOP_LOGPROBS = 20
# Some servers cap the top list lower (OpenAI's legacy completions: 5); the probe retries with this.
FEWER_LOGPROBS = 5

# How far above 0 a server's rounding may put a log-probability (of a token it is all but
# certain of); anything above is no log-probability.
ROUNDING = 1e-6

Step = tuple[str, float, list[tuple[str, float]]]  # (chosen token, its log-prob, the top list)


def _logprob(value: Any) -> float | None:
    """`value` as a log-probability: a finite JSON number at most 0 (at most `ROUNDING` above
    it reads as 0), else None."""
    number = finite(value)
    return None if number is None or number > ROUNDING else min(number, 0.0)


def _top(alts: Any, listed: bool) -> list[tuple[str, float]] | None:
    """A token's top list: `listed`, a list of {"token", "logprob"} objects (the "content"
    shape), else a {token: logprob} object (legacy completions'); empty where it is left out
    (null), without an alternative at -Infinity (ruled out), None where any part of it is
    malformed (NaN, above 0, no number)."""
    if alts is None:
        return []
    if listed and isinstance(alts, list) and all(isinstance(alt, dict) for alt in alts):
        pairs = [(alt.get("token"), alt.get("logprob")) for alt in alts]
    elif not listed and isinstance(alts, dict):
        pairs = list(alts.items())
    else:
        return None
    top: list[tuple[str, float]] = []
    for token, raw in pairs:
        if isinstance(token, str) and raw == -math.inf:
            continue  # ruled out: no alternative at all, and no reason to doubt the rest
        value = _logprob(raw)
        if not isinstance(token, str) or value is None:
            return None
        top.append((token, value))
    return top


def steps(logprobs: Any) -> list[Step] | None:
    """The generated tokens of a reply's `logprobs` object, or None where it has none usable
    (none at all, or any part malformed: read whole or not at all)."""
    if not isinstance(logprobs, dict):
        return None
    out: list[Step] = []
    content = logprobs.get("content")
    if isinstance(content, list):
        for item in content:
            if not isinstance(item, dict):
                return None
            token, chosen, top = item.get("token"), _logprob(item.get("logprob")), _top(item.get("top_logprobs"), True)
            if not isinstance(token, str) or chosen is None or top is None:
                return None
            out.append((token, chosen, top))
        return out
    tokens, chosen_lps, tops = logprobs.get("tokens"), logprobs.get("token_logprobs"), logprobs.get("top_logprobs")
    if not isinstance(tokens, list) or not isinstance(chosen_lps, list) or len(tokens) != len(chosen_lps):
        return None
    if tops is None:
        tops = [None] * len(tokens)
    elif not isinstance(tops, list) or len(tops) != len(tokens):
        return None
    for token, raw, alts in zip(tokens, chosen_lps, tops):
        chosen, top = _logprob(raw), _top(alts, False)
        if not isinstance(token, str) or chosen is None or top is None:
            return None
        out.append((token, chosen, top))
    return out


def usable(parsed: Sequence[Step] | None) -> bool:
    """Whether log-probabilities can give every signal: a chosen token's log-prob and a top
    list of at least two tokens (the margin compares two) at the first step."""
    return bool(parsed) and len(parsed[0][2]) >= 2  # type: ignore[index]


def signals(parsed: Sequence[Step] | None) -> Signals | None:
    """The greedy pass's `Signals` from its parsed steps, by `SignalMeter`'s rules; None without them."""
    if not parsed:
        return None
    chosen: list[float] = []
    margin: float | None = None
    for token, logprob, top in parsed:
        # The step's most likely token: what greedy decoding chose, and what SignalMeter reads.
        best_token, best = max(top, key=lambda t: t[1]) if top else (token, logprob)
        if logprob > best:
            best_token, best = token, logprob
        chosen.append(best)
        if margin is None and letter_index(best_token) is not None:
            probs = [0.0] * 26
            seen = set()
            for piece, lp in [*top, (token, logprob)]:
                i = letter_index(piece)
                # A token listed twice (the chosen one is usually in the top list too) counts once.
                if i is not None and piece not in seen:
                    seen.add(piece)
                    probs[i] += math.exp(lp)
            margin = letter_margin(probs)
    return summarize(chosen, margin)
