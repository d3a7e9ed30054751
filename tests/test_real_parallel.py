"""The parallel engines on the real 270M model: greedy answers of many prompts (`cre batch
--parallel`) and sampled votes of one prompt, decoded as parallel sequences.

Batched decoding adds up floating-point sums in another order than one sequence at a time,
and CPUs round differently, so these tests assert only what holds on every CPU: the same
prompt tokens, answers of the right shape, a greedy answer that differs only where some step
was a near-tie (`assert_same_or_contested`), and each path reproducing itself. How often the
two paths differ is measured by bench/parallel_agreement.py, not asserted here."""

from __future__ import annotations

import pytest

from crecli import grading
from crecli.errors import BackendError
from crecli.models.backend import Generation, GenParams
from support.real import assert_same_or_contested

pytestmark = pytest.mark.real

PROMPTS = [
    "What is the capital of France?",
    "What is 12 plus 30?",
    "Which of these is a color?\n(A) table\n(B) blue\n(C) run",
    "Name a large animal that lives in the sea.",
    "What is the opposite of \"up\"?",
]


def test_parallel_greedy_answers_equal_the_sequential_ones(gemma) -> None:
    from crecli.models.llama import LlamaBackend

    backend = LlamaBackend(gemma, n_ctx=512)
    try:
        # Caps as the quality check uses them, and one cap of 1 token to end on "length".
        params = [GenParams(max_tokens=cap) for cap in (8, 16, 8, 24, 1)]
        sequential = [backend.generate(p, q) for p, q in zip(PROMPTS, params)]
        for parallel in (2, 4):
            together = backend.generate_many(PROMPTS, params, parallel)
            for one, many, p in zip(sequential, together, params):
                assert isinstance(many, Generation)
                assert_same_or_contested(one, many)
                assert 0 < many.output_tokens <= p.max_tokens and many.finish_reason in ("stop", "length")
                assert many.seconds > 0
            # The same wave again decodes the same way: rounding depends on the batch, not on chance.
            assert [g.text for g in backend.generate_many(PROMPTS, params, parallel)] == [
                g.text for g in together if isinstance(g, Generation)]
        assert sequential[-1].finish_reason == "length" and sequential[-1].output_tokens == 1
        # After a wave the sequential path still works on the same model (sampled votes).
        again = backend.generate(PROMPTS[0], GenParams(max_tokens=8, temperature=0.7, seed=3))
        assert again.output_tokens > 0
        # A prompt too long for one sequence's context is an error in its own place.
        long = "word " * 600
        mixed = backend.generate_many([PROMPTS[0], long, PROMPTS[1]], params[:3], 2)
        assert isinstance(mixed[1], BackendError) and "context" in str(mixed[1])
        for one, many in ((sequential[0], mixed[0]), (sequential[1], mixed[2])):
            assert isinstance(many, Generation)
            assert_same_or_contested(one, many)
        assert backend.parallel_memory(4) == 4 * 512 * 18 * 1 * (256 + 256) * 2
    finally:
        backend.close()


def test_parallel_votes_are_well_formed_and_reproducible(gemma) -> None:
    """A prompt's sampled votes decoded together: one vote per seed, of the shape one at a
    time gives, and the same votes every time the same call is made.

    Whether they equal the votes drawn one at a time depends on the CPU's rounding (a seeded
    draw near a probability boundary can flip a token); bench/parallel_agreement.py measures
    how often they differ.
    """
    from crecli.models.llama import LlamaBackend

    backend = LlamaBackend(gemma, n_ctx=512)
    try:
        for prompt in PROMPTS[:3]:
            params = [GenParams(max_tokens=8, temperature=0.7, seed=seed, stop=("\n",)) for seed in (11, 12, 13, 14)]
            backend.generate(prompt, GenParams(max_tokens=8))  # the greedy vote leaves the prompt cached
            together = backend.sample_many(prompt, params)
            one_by_one = [backend.generate(prompt, p) for p in params]
            assert len(together) == len(params)
            assert all(g.prompt_tokens == one_by_one[0].prompt_tokens and g.seconds > 0 for g in together)
            # A sampled vote that draws the stop newline first counts 0 steps (`decoded_output`).
            assert all(0 <= g.output_tokens <= 8 and "\n" not in g.text for g in together)
            assert any(g.output_tokens > 0 for g in together)
            backend.generate(prompt, GenParams(max_tokens=8))
            assert [g.text for g in backend.sample_many(prompt, params)] == [g.text for g in together]
        # Without the prompt in the Llama's cache (another prompt ran last) the votes decode it.
        backend.generate(PROMPTS[4], GenParams(max_tokens=4))
        again = backend.sample_many(PROMPTS[0], params)
        assert [g.text for g in again] == [g.text for g in backend.sample_many(PROMPTS[0], params)]
        # The votes' context counts against --memory-budget once it exists (it did not).
        from crecli.models.gguf import kv_bytes_per_token

        assert backend.cache_memory() >= 2 * 512 * kv_bytes_per_token(gemma.file) > 0
    finally:
        backend.close()
    assert backend.cache_memory() == 0


def test_votes_after_a_parallel_wave_load_its_prompt_cells_instead_of_decoding_them(gemma, monkeypatch) -> None:
    """`cre batch --parallel`: the greedy wave keeps each prompt's cells (`Handoff`), and the
    votes drawn next load them into their shared sequence; they decoded every prompt again."""
    import llama_cpp

    from crecli.models.llama import LlamaBackend

    backend = LlamaBackend(gemma, n_ctx=512)
    try:
        backend.generate(PROMPTS[4], GenParams(max_tokens=4))  # the Llama holds another prompt
        backend.generate_many(PROMPTS[:3], [GenParams(max_tokens=8)] * 3, 3)
        real = llama_cpp.llama_state_seq_set_data
        restored: list[int] = []
        monkeypatch.setattr(llama_cpp, "llama_state_seq_set_data",
                            lambda ctx, data, size, seq: restored.append(seq) or real(ctx, data, size, seq))
        params = [GenParams(max_tokens=8, temperature=0.7, seed=seed, stop=("\n",)) for seed in (11, 12, 13, 14)]
        votes = backend.sample_many(PROMPTS[1], params)
        assert backend._votes is not None and restored == [backend._votes.root]
        assert len(votes) == 4 and all(0 <= g.output_tokens <= 8 and "\n" not in g.text for g in votes)
        assert any(g.output_tokens > 0 for g in votes)
        assert all(g.prompt_tokens == votes[0].prompt_tokens > 0 for g in votes)
    finally:
        backend.close()


def test_a_choice_answer_ends_at_its_option_letter_on_both_paths(gemma) -> None:
    from crecli.models.llama import LlamaBackend

    prompt = PROMPTS[2]
    letters = grading.option_letters("choice", prompt)
    backend = LlamaBackend(gemma, n_ctx=512)
    try:
        full = backend.generate(prompt, GenParams(max_tokens=8))
        backend.llm.reset()  # the same decode from the same state, up to the deciding token
        ended = backend.generate(prompt, GenParams(max_tokens=8, option_letters=letters))
        # gemma writes " (B)" here, token by token: ended once "(B" is out, for fewer steps.
        opening = full.text[: full.text.index(")")]
        assert ended.text == grading.decided_option(opening, letters), (full.text, ended.text)
        assert grading.normalize(ended.text, "choice") == grading.normalize(full.text, "choice")
        assert ended.output_tokens < full.output_tokens and ended.finish_reason == "stop"
        [together] = backend.generate_many([prompt, PROMPTS[0]], [GenParams(max_tokens=8, option_letters=letters),
                                                                   GenParams(max_tokens=8)], 2)[:1]
        assert isinstance(together, Generation)
        assert_same_or_contested(ended, together)
        if together.text == ended.text:
            assert together.output_tokens == ended.output_tokens
    finally:
        backend.close()
