"""Real llama.cpp runs on the real 270M model: CI pulls it first (see .ci/run).

These are skipped, loudly, when the model is not on disk (the `gemma` fixture, in
conftest); CI sets CRE_REQUIRE_REAL=1 so that a missing model fails instead.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.real


def test_llama_backend_generates_with_completion_template(gemma) -> None:
    from crecli.models.backend import GenParams
    from crecli.models.llama import LlamaBackend

    backend = LlamaBackend(gemma)
    try:
        gen = backend.generate("What is the capital of France?", GenParams(max_tokens=8))
        assert "paris" in gen.text.lower()
        assert gen.prompt_tokens > 20 and 0 < gen.output_tokens <= 8 and gen.seconds > 0
        # Same prompt again: llama.cpp reuses the KV cache, and sampling with seeds works.
        samples = backend.sample("What is the capital of France?", GenParams(max_tokens=8, temperature=0.7), [1, 2, 3])
        # A sampled vote may end on its first token, the stop newline, which is never fed: 0
        # decode steps (`tokens.decoded_output`). Some vote still writes an answer.
        assert len(samples) == 3 and any(s.output_tokens > 0 for s in samples)
        vectors = backend.embed(["a cat", "a dog"])
        assert len(vectors) == 2 and len(vectors[0]) > 100
    finally:
        backend.close()


def test_greedy_answers_carry_signals_and_the_head_is_counted_on_the_real_model(gemma) -> None:
    from crecli.models import bench
    from crecli.models.backend import GenParams
    from crecli.models.llama import LlamaBackend
    from crecli.quality import QualityCheck, vote_params

    backend = LlamaBackend(gemma)
    try:
        prompt = "Which is a fruit?\n(A) stone\n(B) apple\n(C) chair"
        gen = backend.generate(prompt, vote_params(QualityCheck(), 0, 8, prompt))
        s = gen.signals
        assert s is not None and s.min_logprob <= s.mean_logprob <= 0.0
        if "(" in gen.text or gen.text.strip()[:1].isupper():
            assert s.margin is not None and 0.0 <= s.margin <= 1.0
        # Sampled votes carry none: their token is not the argmax, so its log-prob is unknown.
        assert backend.generate(prompt, GenParams(max_tokens=8, temperature=0.7, seed=1)).signals is None
        head = bench.cached_head_tokens(backend.llm, gemma.prompt_format)
        assert 20 < head < gen.prompt_tokens  # the few-shot preamble, not the question
    finally:
        backend.close()


def test_cre_ask_end_to_end(gemma) -> None:
    env = dict(os.environ)
    result = subprocess.run(
        [sys.executable, "-m", "crecli", "ask", "What is the capital of France?", "--model", "gemma-3-270m"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout


def test_probe_runs_the_real_model_on_this_cpu(gemma) -> None:
    """The child-process probe that `cre models bench` runs first: it loads the model and
    decodes a few tokens with cre's buffer choice for this CPU (extra buffer types off on
    AMX Xeons, where a native build otherwise crashes at the first decode)."""
    from crecli.models.llama import probe

    probe(gemma)


def test_bench_times_short_prompts_after_the_cached_head(gemma) -> None:
    from crecli.models import bench

    speed = bench.measure(gemma, pp_tokens=16, tg_tokens=4, repeats=2)
    # The head is counted, the timed prompt is the 16 tokens after it, and both phases ran.
    assert speed.head_tokens is not None and speed.head_tokens > 10
    assert speed.pp_tokens == 16 and speed.tg_tokens == 4 and speed.repeats == 2
    assert speed.pp_tokens_per_s > 0 and speed.tg_tokens_per_s > 0
    # A prompt's pass is split off a short prompt timed beside the long one, and never takes
    # the long prompt's whole time (`bench.split_pass`).
    assert speed.pp_short_tokens == 16 // bench.PP_SHORT_SHARE
    prompt = speed.pass_seconds + speed.pp_tokens / speed.pp_tokens_per_s
    assert 0.0 <= speed.pass_seconds <= bench.MAX_PASS_SHARE * prompt + 1e-9
    assert prompt == pytest.approx(speed.long_seconds)  # the long prompt costs what it took


def test_bench_past_a_small_context_says_so_before_measuring(gemma) -> None:
    # llama.cpp's decode stopped it with a bare RuntimeError, a traceback out of `cre models bench`.
    from dataclasses import replace

    from crecli.errors import CreError
    from crecli.models import bench

    with pytest.raises(CreError, match=r"needs a context of \d+, and its `context` is 64; lower --pp-tokens"):
        bench.measure(replace(gemma, context=64), pp_tokens=48, tg_tokens=64, repeats=1)


def test_requantizing_the_real_model_makes_the_same_bytes_on_any_thread_count_and_a_model_that_runs(
    gemma, tmp_path, monkeypatch
) -> None:
    from crecli.config import ModelSpec
    from crecli.models.backend import GenParams
    from crecli.models.llama import LlamaBackend
    from crecli.models.pull import requantize, sha256_file

    made = []
    for threads in ("1", "2"):
        monkeypatch.setenv("CRE_THREADS", threads)
        made.append(tmp_path / f"q4_0-{threads}.gguf")
        requantize(gemma.file, made[-1], "Q4_0")
    # A `requantize_from` model is pinned by the sha256 of what this makes: the bytes must
    # not depend on how many threads made them.
    assert sha256_file(made[0]) == sha256_file(made[1])
    assert made[0].stat().st_size < gemma.file.stat().st_size
    backend = LlamaBackend(ModelSpec(name="gemma-q4_0", path=str(made[0]), prompt_format="completion"))
    try:
        # Loaded and run by llama.cpp; what it answers is measured by a fit, not here (this
        # 270M's Q4_0 says " France" where its shipped file says " Paris").
        gen = backend.generate("What is the capital of France?", GenParams(max_tokens=8))
        assert gen.text.strip() and 0 < gen.output_tokens <= 8
    finally:
        backend.close()
