"""What the real-model tests accept where CPUs round differently.

bench/parallel_agreement.py measures how often that happens, with the same bound.
"""

from __future__ import annotations

from crecli.models.backend import Generation

# A greedy step can pick another token under other rounding only if its top two tokens are
# nearly tied, so the chosen token's probability is at most about one half.
CONTESTED_LOGPROB = -0.6


def assert_same_or_contested(a: Generation, b: Generation) -> None:
    """Two greedy decodes of one prompt: the same answer, or one with a near-tied step."""
    assert a.prompt_tokens == b.prompt_tokens
    if a.text != b.text:
        lows = [g.signals.min_logprob for g in (a, b) if g.signals is not None]
        assert lows and min(lows) < CONTESTED_LOGPROB, (a.text, b.text, lows)
