"""Snapshots of a cluster's answered examples (`LlamaBackend._warm_prefix`) on the real 270M
model, whose sliding-window attention makes its cache the hard case: prompts of two clusters
in turn restore their examples' KV cells instead of decoding them again, and answer as a freshly
loaded model that decodes them: the same prompt tokens, and the same answer unless a step
was a near-tie (decoding a prompt's tail after restored cells batches it differently, and
CPUs round differently)."""

from __future__ import annotations

import pytest

from crecli.models.backend import GenParams
from support.real import assert_same_or_contested

pytestmark = pytest.mark.real

SUMS = (("What is 3 plus 4?", "7"), ("What is 10 plus 5?", "15"))
CHOICES = (("Which of these is a fruit?\n(A) apple\n(B) car", "(A)"),)
PROMPTS = [
    ("What is 12 plus 30?", SUMS),
    ("Which of these is an animal?\n(A) dog\n(B) rock", CHOICES),
    ("What is 2 plus 9?", SUMS),
    ("Which of these is blue?\n(A) grass\n(B) sky", CHOICES),
    ("What is 8 plus 8?", SUMS),
]


AFTER = "What is 2 plus 9?"  # asked after a cancel, to see the model left usable


def assert_answers_as_fresh(gemma, got, n_ctx: int) -> None:
    """`got` (the answer to AFTER, shown SUMS) is a freshly loaded model's answer."""
    from crecli.models.llama import LlamaBackend

    fresh = LlamaBackend(gemma, n_ctx=n_ctx)
    try:
        want = fresh.generate(AFTER, GenParams(max_tokens=8, shots=SUMS))
    finally:
        fresh.close()
    assert_same_or_contested(want, got)


def test_example_prefixes_are_restored_and_answer_as_a_fresh_model(gemma) -> None:
    from crecli.models.llama import LlamaBackend

    backend = LlamaBackend(gemma, n_ctx=1024)
    try:
        mixed = [backend.generate(p, GenParams(max_tokens=8, shots=s)) for p, s in PROMPTS]
        # The first prompt of each cluster decodes its examples; every later one, coming
        # after the other cluster's prompt, restores them.
        assert backend.prefix_restores == 3
        assert len(backend.shot_prefix(SUMS)) > len(backend.shot_prefix(()))
        # Two snapshots held, which `--memory-budget` counts (`ModelPool`).
        held = backend.cache_memory()
        assert len(backend._prefixes) == 2 and held == sum(len(h.data) for h in backend._prefixes.values()) > 0
        print(f"two example snapshots hold {held} bytes")
    finally:
        backend.close()
    for (prompt, shots), got in zip(PROMPTS, mixed):
        fresh = LlamaBackend(gemma, n_ctx=1024)
        try:
            want = fresh.generate(prompt, GenParams(max_tokens=8, shots=shots))
            assert fresh.prefix_restores == 0
        finally:
            fresh.close()
        assert_same_or_contested(want, got)


def test_a_request_that_gives_up_stops_its_decode_and_leaves_the_model_usable(gemma) -> None:
    # `cre serve` cancels a request whose client left or whose timeout passed; the decode of
    # an in-process model ran on to max_tokens, holding the model for an answer nobody reads.
    from crecli import cancel
    from crecli.models.llama import LlamaBackend

    prompt = "Write a long story about a dragon who learns to count."
    backend = LlamaBackend(gemma, n_ctx=1024)
    try:
        token = cancel.Token()
        pieces: list[str] = []

        def emit(text: str) -> None:
            pieces.append(text)
            token.cancel()  # the client leaves as the first words arrive

        with cancel.scope(token), pytest.raises(cancel.Cancelled):
            backend.generate_streaming(prompt, GenParams(max_tokens=200), emit)
        assert 0 < len("".join(pieces).split()) < 20
        # Stopped between tokens, the model answers the next prompt as a fresh one does.
        after = backend.generate(AFTER, GenParams(max_tokens=8, shots=SUMS))
    finally:
        backend.close()
    assert_answers_as_fresh(gemma, after, 1024)


def test_a_request_that_gives_up_stops_its_prompts_evaluation(gemma, monkeypatch: pytest.MonkeyPatch,
                                                              capfd: pytest.CaptureFixture[str]) -> None:
    # The stopping criterion above acts between generated tokens; a long prompt's evaluation
    # ran on to its end after a cancel (tens of seconds for a long prompt on 2 cores), holding
    # the model. llama.cpp's abort callback (`runtime.abort_on_cancel`) stops it at its next
    # graph node. The prompt is 4 batches of 512; the request gives up as the first returns.
    from crecli import cancel
    from crecli.models.llama import LlamaBackend

    monkeypatch.delenv("CRE_DEBUG", raising=False)
    prompt = "Summarise: " + " ".join(f"word{i}" for i in range(450))
    backend = LlamaBackend(gemma, n_ctx=2048)
    try:
        llm = backend.llm
        n_prompt = backend.count_tokens(backend.prepare(prompt, GenParams(max_tokens=4))[0])
        assert n_prompt > 3 * llm.n_batch
        token = cancel.Token()
        ctx = llm._ctx
        decode = ctx.decode
        batches: list[int] = []

        def decode_then_give_up(batch: object) -> None:
            decode(batch)
            batches.append(llm.n_tokens)
            token.cancel()  # the client leaves while the prompt is being read

        ctx.decode = decode_then_give_up
        try:
            with cancel.scope(token), pytest.raises(cancel.Cancelled):
                backend.generate(prompt, GenParams(max_tokens=4))
        finally:
            del ctx.decode
        # The second batch was aborted: one of four read, and the Llama counts only that one.
        assert len(batches) == 1 and llm.n_tokens == llm.n_batch < n_prompt
        # llama.cpp's warning about the aborted batch ("decode: removing memory module
        # entries"), which llama-cpp-python's callback printed, stays off stderr.
        assert "removing memory" not in capfd.readouterr().err
        after = backend.generate(AFTER, GenParams(max_tokens=8, shots=SUMS))
    finally:
        backend.close()
    assert_answers_as_fresh(gemma, after, 2048)
