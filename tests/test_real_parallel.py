"""The parallel greedy engine (`cre batch --parallel`) on the real 270M model: the same answers,
token counts and finish reasons as the sequential path, prompt by prompt."""

from __future__ import annotations

import pytest

from crecli.errors import BackendError
from crecli.models.backend import Generation, GenParams
from test_real_model import gemma  # noqa: F401 - the fixture

pytestmark = pytest.mark.real

PROMPTS = [
    "What is the capital of France?",
    "What is 12 plus 30?",
    "Which of these is a color?\n(A) table\n(B) blue\n(C) run",
    "Name a large animal that lives in the sea.",
    "What is the opposite of \"up\"?",
]


def test_parallel_greedy_answers_equal_the_sequential_ones(gemma) -> None:  # noqa: F811
    from crecli.models.llama import LlamaBackend

    backend = LlamaBackend(gemma, n_ctx=512)
    try:
        # Caps as the quality check uses them, and one cap of 1 token to end on "length".
        params = [GenParams(max_tokens=cap) for cap in (8, 16, 8, 24, 1)]
        sequential = [backend.generate(p, q) for p, q in zip(PROMPTS, params)]
        for parallel in (2, 4):
            together = backend.generate_many(PROMPTS, params, parallel)
            for one, many in zip(sequential, together):
                assert isinstance(many, Generation)
                assert (many.text, many.prompt_tokens, many.output_tokens, many.finish_reason) == (
                    one.text, one.prompt_tokens, one.output_tokens, one.finish_reason)
                assert many.seconds > 0
        assert sequential[-1].finish_reason == "length" and sequential[-1].output_tokens == 1
        # After a wave the sequential path still works on the same model (sampled votes).
        again = backend.generate(PROMPTS[0], GenParams(max_tokens=8, temperature=0.7, seed=3))
        assert again.output_tokens > 0
        # A prompt too long for one sequence's context is an error in its own place.
        long = "word " * 600
        mixed = backend.generate_many([PROMPTS[0], long, PROMPTS[1]], params[:3], 2)
        assert isinstance(mixed[1], BackendError) and "context" in str(mixed[1])
        assert [g.text for g in (mixed[0], mixed[2])] == [sequential[0].text, sequential[1].text]  # type: ignore[union-attr]
        assert backend.parallel_memory(4) == 4 * 512 * 18 * 1 * (256 + 256) * 2
    finally:
        backend.close()


def test_parallel_votes_are_the_sequential_votes(gemma) -> None:  # noqa: F811
    """A prompt's sampled votes decoded together: the same seeded samplers as one at a time.

    Batched decoding may reorder floating-point sums; on this model and these prompts the
    votes came out identical, so any difference here is a change worth a look.
    """
    from crecli.models.llama import LlamaBackend

    backend = LlamaBackend(gemma, n_ctx=512)
    try:
        for prompt in PROMPTS[:3]:
            params = [GenParams(max_tokens=8, temperature=0.7, seed=seed, stop=("\n",)) for seed in (11, 12, 13, 14)]
            backend.generate(prompt, GenParams(max_tokens=8))  # the greedy vote leaves the prompt cached
            together = backend.sample_many(prompt, params)
            one_by_one = [backend.generate(prompt, p) for p in params]
            assert [g.text for g in together] == [g.text for g in one_by_one]
            assert [g.output_tokens for g in together] == [g.output_tokens for g in one_by_one]
            assert all(g.prompt_tokens == one_by_one[0].prompt_tokens and g.seconds > 0 for g in together)
        # Without the prompt in the Llama's cache (another prompt ran last) the votes decode it.
        backend.generate(PROMPTS[4], GenParams(max_tokens=4))
        again = backend.sample_many(PROMPTS[0], params)
        assert [g.text for g in again] == [g.text for g in backend.sample_many(PROMPTS[0], params)]
    finally:
        backend.close()
