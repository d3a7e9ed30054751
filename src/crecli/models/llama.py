"""The llama.cpp backend, through llama-cpp-python.

The model loads on first use, not at construction, so building a ladder is free and only
the rungs a query reaches cost memory. `n_threads` defaults to the core count: llama.cpp's
threads spin while they wait, so more threads than cores (or two models computing at once)
collapses throughput.

`ParallelGreedy` decodes the greedy answers of many prompts as parallel sequences of a
second context on the same loaded model (`cre batch --parallel`); everything else goes
through llama-cpp-python's single-sequence `Llama`.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from crecli.errors import BackendError, CreError, PromptTooLong
from crecli.models.backend import Backend, Generation, GenParams
from crecli.models.gguf import kv_bytes_per_token
from crecli.models.prompting import Rendered
from crecli.models.pull import require_file
from crecli.models.runtime import CRASH_HINT, default_threads, model_params, quiet_stderr, use_extra_bufts
from crecli.models.tokens import SignalMeter, letter_tokens, prompt_head, prompt_tokens, shared_prefix

if TYPE_CHECKING:
    from crecli.config import ModelSpec


# Snapshots of answered examples' KV cells kept per loaded model (`LlamaBackend._warm_prefix`).
# One holds a cluster's head and examples, about 100-400 tokens: 1-5 MB on the 0.5B and
# 3-11 MB on the 1.5B (KV bytes per token from their GGUF headers).
PREFIX_SNAPSHOTS = 16


def probe(spec: "ModelSpec", timeout: float = 300.0) -> None:
    """Load `spec` and decode a few tokens in a child process, so that a native crash is
    reported with its cause instead of killing this process with a bare segfault."""
    path = require_file(spec)
    cmd = _probe_command(path, spec)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=os.environ.copy())
    except subprocess.TimeoutExpired as exc:
        raise BackendError(f"loading {spec.name!r} and decoding 4 tokens took over {timeout:.0f} s; is the machine busy?") from exc
    if proc.returncode < 0:
        sig = -proc.returncode
        try:
            how = signal.Signals(sig).name
        except ValueError:
            how = f"signal {sig}"
        raise BackendError(CRASH_HINT.format(how=how, what=repr(spec.name)))
    if proc.returncode != 0:
        detail = (proc.stderr.strip().splitlines() or ["no message"])[-1]
        raise BackendError(f"llama.cpp could not run {spec.name!r} from {path}: {detail}")


def _probe_command(path: Path, spec: "ModelSpec") -> list[str]:
    return [sys.executable, "-m", "crecli.models.llama", str(path), str(spec.context), str(spec.n_gpu_layers)]


class LlamaBackend(Backend):
    def __init__(
        self,
        spec: "ModelSpec",
        n_threads: int | None = None,
        n_gpu_layers: int | None = None,
        n_ctx: int | None = None,
    ) -> None:
        super().__init__(spec)
        self.n_threads = n_threads or default_threads()
        self.n_gpu_layers = spec.n_gpu_layers if n_gpu_layers is None else n_gpu_layers
        self.n_ctx = n_ctx or spec.context
        self._llm: Any = None
        self._embedder: Any = None
        self._parallel: ParallelGreedy | None = None
        self._votes: ParallelVotes | None = None
        self._handoff: dict[str, Handoff] = {}  # rendered prompt -> its cells from the last wave
        # Answered examples -> the KV cells of the tokens every prompt shown them starts with
        # (`_warm_prefix`), most recently used last; and those tokens, per set of examples.
        self._prefixes: OrderedDict[tuple[tuple[str, str], ...], Handoff] = OrderedDict()
        self._prefix_tokens: dict[tuple[tuple[str, str], ...], list[int]] = {}
        self.prefix_restores = 0  # prompts whose examples came from a snapshot
        self._letters: dict[int, int] | None = None
        # Greedy answers carry `Signals`; off only to measure what reading them costs.
        self.read_signals = True
        self.load_seconds = 0.0

    @property
    def letters(self) -> dict[int, int]:
        if self._letters is None:
            self._letters = letter_tokens(self.llm)
        return self._letters

    def _load(self, embedding: bool = False) -> Any:
        path = require_file(self.spec)
        try:
            from llama_cpp import Llama
        except ImportError as exc:  # pragma: no cover - install problem
            raise BackendError(f"llama-cpp-python is not importable ({exc}); reinstall crecli") from exc
        start = time.perf_counter()
        try:
            with quiet_stderr(), model_params(use_extra_bufts()):
                llm = Llama(
                    model_path=str(path),
                    n_ctx=self.n_ctx,
                    n_threads=self.n_threads,
                    n_threads_batch=self.n_threads,
                    n_gpu_layers=self.n_gpu_layers,
                    embedding=embedding,
                    # Mean pooling: decoder models have no CLS token worth reading.
                    **({"pooling_type": 1} if embedding else {}),
                    verbose=False,
                )
        except Exception as exc:  # llama.cpp reports load failures as bare ValueErrors
            raise BackendError(f"llama.cpp could not load {self.spec.name!r} from {path}: {exc}") from exc
        if not embedding:
            # One tiny decode allocates llama.cpp's compute buffers now, so the first real
            # query is not charged for it (costs are measured per query).
            llm.eval(llm.tokenize(b" ", add_bos=True))
            llm.reset()
        self.load_seconds += time.perf_counter() - start
        return llm

    @property
    def llm(self) -> Any:
        if self._llm is None:
            self._llm = self._load()
        return self._llm

    def _fit_max_tokens(self, n_prompt: int, wanted: int) -> int:
        room = self.n_ctx - n_prompt
        if room <= 0:
            raise PromptTooLong(
                f"prompt is {n_prompt} tokens, which fills {self.spec.name!r}'s context of {self.n_ctx}; "
                "shorten it or raise `context` in models.toml"
            )
        return min(wanted, room)

    def count_tokens(self, rendered: Rendered) -> int:
        return len(prompt_tokens(self.llm, rendered))

    def shot_prefix(self, shots: tuple[tuple[str, str], ...]) -> list[int]:
        """The tokens every prompt shown `shots` starts with: the head, the examples and the
        start of the prompt's own turn (what two differing probe prompts share)."""
        if shots not in self._prefix_tokens:
            self._prefix_tokens[shots] = prompt_head(self.llm, self.spec.prompt_format, shots)
        return self._prefix_tokens[shots]

    def _warm_prefix(self, shots: tuple[tuple[str, str], ...]) -> None:
        """Make the `Llama` hold the examples' prefix (`shot_prefix`) before a prompt shown them.

        llama-cpp-python reuses what the previous prompt shares with this one, which covers
        a batch answered cluster by cluster. A server or a run of mixed clusters would process
        a cluster's examples again each time another cluster came between; so the first time
        a prefix is decoded its KV cells are kept (`llama_state_seq_get_data`, a few MB), and
        later prompts restore them instead (`llama_state_seq_set_data`), keeping the
        PREFIX_SNAPSHOTS most recently used.
        """
        import llama_cpp

        llm = self.llm
        prefix = self.shot_prefix(shots)
        n = len(prefix)
        if not n or (llm.n_tokens >= n and list(llm.input_ids[:n]) == prefix):
            return
        snapshot = self._prefixes.get(shots)
        if snapshot is not None:
            if snapshot.restore(llm):
                self._prefixes.move_to_end(shots)
                self.prefix_restores += 1
                return
            del self._prefixes[shots]
        # Decode the prefix after what the cache already shares with it (usually the head).
        common = len(shared_prefix([list(llm.input_ids[: llm.n_tokens]), prefix]))
        memory = llama_cpp.llama_get_memory(llm._ctx.ctx)
        if not llama_cpp.llama_memory_seq_rm(memory, -1, common, -1):
            # Some caches (sliding-window attention) cannot drop a tail: start afresh.
            llama_cpp.llama_memory_clear(memory, True)
            common = 0
        llm.n_tokens = common
        llm.eval(prefix[common:])
        self._prefixes[shots] = Handoff.save(llm._ctx.ctx, 0, prefix)
        while len(self._prefixes) > PREFIX_SNAPSHOTS:
            self._prefixes.popitem(last=False)

    def complete(self, rendered: Rendered, params: GenParams) -> Generation:
        llm = self.llm
        tokens = prompt_tokens(llm, rendered)
        n_prompt = len(tokens)
        start = time.perf_counter()
        handoff = self._handoff.pop(rendered.text, None)
        if handoff is not None:
            handoff.restore(llm)
        elif params.shots:
            self._warm_prefix(params.shots)
        meter = SignalMeter(self.letters) if params.temperature == 0.0 and self.read_signals else None
        processors = None
        if meter is not None:
            from llama_cpp import LogitsProcessorList

            def observe(_ids: Any, scores: Any) -> Any:
                meter.observe(scores)
                return scores

            processors = LogitsProcessorList([observe])
        # Tokens, not text: llama-cpp-python would tokenize a string with special tokens
        # parsed, user text included (`tokenize`).
        out = llm.create_completion(
            tokens,
            max_tokens=self._fit_max_tokens(n_prompt, params.max_tokens),
            temperature=params.temperature,
            top_p=params.top_p,
            top_k=params.top_k,
            min_p=0.0,
            repeat_penalty=1.0,
            seed=params.seed,
            stop=list(params.stop) or None,
            logits_processor=processors,
        )
        seconds = time.perf_counter() - start
        choice = out["choices"][0]
        usage = out.get("usage", {})
        return Generation(
            text=choice["text"],
            prompt_tokens=int(usage.get("prompt_tokens", n_prompt)),
            output_tokens=int(usage.get("completion_tokens", 0)),
            seconds=seconds,
            finish_reason=str(choice.get("finish_reason") or "stop"),
            signals=meter.signals() if meter is not None else None,
        )

    def generate_many(
        self, prompts: Sequence[str], params: Sequence[GenParams], parallel: int = 1
    ) -> list[Generation | CreError]:
        """Greedy answers decoded `parallel` at a time (see `ParallelGreedy`); otherwise one by one.

        Only greedy parameters go parallel: sampled votes keep the sequential path, whose
        seeded sampler chain is what `cre fit` recorded. A single prompt also stays
        sequential, so its later votes find its prompt in the `Llama`'s KV cache.
        """
        if parallel <= 1 or len(prompts) < 2 or any(p.temperature != 0.0 for p in params):
            return super().generate_many(prompts, params, parallel)
        llm = self.llm
        if self._parallel is None or self._parallel.n_seq != parallel:
            self._close_parallel()
            self._parallel = ParallelGreedy(llm, parallel, self.n_ctx, self.n_threads)
        prepared = [self.prepare(prompt, p) for prompt, p in zip(prompts, params, strict=True)]
        # The last wave's leftovers go: votes come right after the wave that decoded their prompt.
        self._handoff.clear()
        return self._parallel.run([rendered for rendered, _ in prepared], [p for _, p in prepared], self._handoff, self.letters)

    def sample_many(self, prompt: str, params: Sequence[GenParams]) -> list[Generation]:
        """Sampled votes of one prompt, decoded together as parallel sequences (`ParallelVotes`).

        Each vote has its own sampler chain, the one llama-cpp-python builds for
        `complete`'s settings, seeded with the vote's seed. A single vote, or a greedy one,
        takes the sequential path.
        """
        if len(params) < 2 or any(p.temperature == 0.0 for p in params):
            return super().sample_many(prompt, params)
        prepared = [self.prepare(prompt, p) for p in params]
        rendered = prepared[0][0]
        llm = self.llm
        tokens = prompt_tokens(llm, rendered)
        self._fit_max_tokens(len(tokens), 1)  # a prompt that fills the context fails as `complete` fails
        if self._votes is None or self._votes.n_seq < len(params):
            self._close_votes()
            self._votes = ParallelVotes(llm, max(len(params), VOTE_SEQUENCES), self.n_ctx, self.n_threads)
        return self._votes.run(tokens, [p for _, p in prepared])

    def _close_votes(self) -> None:
        if self._votes is not None:
            self._votes.close()
            self._votes = None

    def cache_memory(self) -> int:
        """The snapshots of answered examples' KV cells kept for reuse (`_warm_prefix`)."""
        return sum(len(h.data) for h in self._prefixes.values())

    def parallel_memory(self, parallel: int) -> int:
        """The KV cache of the parallel context: `parallel` sequences of `n_ctx` tokens.

        From the GGUF header (layers, KV heads, key and value widths) at 16-bit K and V,
        llama.cpp's default cache type (a unified cache keeps sliding-window layers at full
        size too). Not counted, as for the single-sequence context: compute buffers, and the
        `Handoff` copies of a wave's prompts, which are at most one chunk's prompts' cells.
        """
        if parallel <= 1:
            return 0
        return parallel * self.n_ctx * kv_bytes_per_token(require_file(self.spec))

    def _close_parallel(self) -> None:
        self._handoff.clear()
        if self._parallel is not None:
            self._parallel.close()
            self._parallel = None

    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        if self._embedder is None:
            self._embedder = self._load(embedding=True)
        vectors: list[list[float]] = []
        for text in texts:
            # One text per call: llama-cpp-python's batch embedding packs sequences into
            # one context, and a long text would push others out.
            vectors.append(list(self._embedder.embed(text, normalize=True, truncate=True)))
        return vectors

    def close(self) -> None:
        # The parallel contexts use the Llama's model, so they go first.
        self._close_parallel()
        self._close_votes()
        self._prefixes.clear()
        for attr in ("_llm", "_embedder"):
            llm = getattr(self, attr)
            if llm is not None:
                try:
                    llm.close()
                except Exception:
                    pass
                setattr(self, attr, None)


# ---------------------------------------------------------------- parallel greedy decoding


@dataclass
class _Stream:
    """One prompt's greedy answer in flight in the parallel context."""

    index: int  # position in the caller's list
    prompt: list[int]
    max_tokens: int
    stop: list[bytes]
    seq: int = -1
    n_past: int = 0
    feed: list[int] = field(default_factory=list)  # tokens to decode in the next step
    out: list[int] = field(default_factory=list)
    multibyte_fix: int = 0
    seconds: float = 0.0
    meter: SignalMeter | None = None


def _advance_stream(llm: Any, vocab: Any, stream: _Stream, token: int) -> tuple[bytes, str] | None:
    """Take one greedy token; (text, finish_reason) once the answer is complete.

    The same stop rules, in the same order, as llama-cpp-python 0.3's `_create_completion`
    (non-streaming): an end-of-generation token stops without being counted; a stop string
    cuts the text before it; the token cap gives "length"; a token that ends inside a
    multi-byte character defers the checks, as there.
    """
    import llama_cpp

    if llama_cpp.llama_vocab_is_eog(vocab, token):
        return llm.detokenize(stream.out, prev_tokens=stream.prompt), "stop"
    stream.out.append(token)
    text = llm.detokenize(stream.out, prev_tokens=stream.prompt)
    for k, char in enumerate(text[-3:]):
        k = 3 - k
        for num, pattern in ((2, 192), (3, 224), (4, 240)):
            if num > k and pattern & char == pattern:
                stream.multibyte_fix = num - k
    if stream.multibyte_fix > 0:
        stream.multibyte_fix -= 1
        return None
    hits = [s for s in stream.stop if s in text]
    if hits:
        return text[: text.index(hits[0])], "stop"
    if len(stream.out) >= stream.max_tokens:
        return text, "length"
    return None


def _take(llm: Any, vocab: Any, stream: _Stream, token: int, n_ctx: int) -> tuple[bytes, str] | None:
    """`_advance_stream`, and an answer whose sequence has filled its `n_ctx` cells ends
    there ("length"), where the sequential path would fail; else `token` is fed next."""
    done = _advance_stream(llm, vocab, stream, token)
    if done is None and stream.n_past >= n_ctx:
        done = (llm.detokenize(stream.out, prev_tokens=stream.prompt), "length")
    if done is None:
        stream.feed = [token]
    return done


def _put(batch: Any, n: int, token: int, pos: int, seq: int, logits: bool) -> None:
    """Entry `n` of a llama.cpp batch: one token of one sequence."""
    batch.token[n] = token
    batch.pos[n] = pos
    batch.n_seq_id[n] = 1
    batch.seq_id[n][0] = seq
    batch.logits[n] = logits


@dataclass
class Handoff:
    """One sequence's KV cells, copied out of the parallel context for the `Llama`'s own.

    After a wave, a prompt's sampled votes run on the single-sequence `Llama`, whose cache
    holds whatever it decoded last; without this, each of them would process its prompt
    again (measured on qwen-0.5b: the votes' time tripled and the wave was a net loss).
    Restoring the cells (`llama_state_seq_set_data`) and the token list makes the `Llama`
    find the prompt cached, as if it had just decoded the greedy answer itself.
    """

    tokens: list[int]  # what the cells hold: the prompt, then the answer tokens decoded
    data: Any  # ctypes byte buffer from llama_state_seq_get_data

    @classmethod
    def save(cls, ctx: Any, seq: int, tokens: list[int]) -> "Handoff":
        import ctypes

        import llama_cpp

        size = llama_cpp.llama_state_seq_get_size(ctx, seq)
        data = (ctypes.c_uint8 * size)()
        llama_cpp.llama_state_seq_get_data(ctx, data, size, seq)
        return cls(tokens, data)

    def restore(self, llm: Any) -> bool:
        """Put the cells into `llm`'s (sequence 0) and tell it which tokens they hold."""
        import llama_cpp

        memory = llama_cpp.llama_get_memory(llm._ctx.ctx)
        llama_cpp.llama_memory_clear(memory, True)
        llm.n_tokens = 0
        if not llama_cpp.llama_state_seq_set_data(llm._ctx.ctx, self.data, len(self.data), 0):
            return False
        llm.input_ids[: len(self.tokens)] = self.tokens
        llm.n_tokens = len(self.tokens)
        # The logits in `llm` are not this prompt's: make it decode the last prompt token again.
        llm._requires_eval = True
        return True


def _sequences_context(llm: Any, n_seq: int, n_ctx: int, n_batch: int, n_threads: int, what: str) -> Any:
    """A llama.cpp context on `llm`'s loaded weights for `n_seq` sequences and one more,
    `root`, which holds a prefix they share, in one unified KV cache of `n_ctx` cells;
    otherwise the `Llama`'s own context parameters."""
    import llama_cpp

    params = llama_cpp.llama_context_params.from_buffer_copy(llm.context_params)
    params.n_ctx = n_ctx
    params.n_batch = n_batch
    params.n_seq_max = n_seq + 1
    params.kv_unified = True
    params.n_threads = params.n_threads_batch = n_threads
    with quiet_stderr():
        ctx = llama_cpp.llama_init_from_model(llm._model.model, params)
    if not ctx:
        raise BackendError(f"llama.cpp could not create a context for {what}")
    return ctx


class ParallelGreedy:
    """Greedy answers of many prompts, decoded as parallel sequences of one llama.cpp context.

    The context is built on the loaded model of a `Llama` (weights are shared, not copied)
    with `n_seq` sequences (plus `root`, see `_decode_shared_prefix`) in one unified KV
    cache of `n_seq * n_ctx_seq` cells, and otherwise the `Llama`'s own context parameters.
    Unified, because llama.cpp refuses to move a sequence's cells between caches of
    different stream counts (`n_stream mismatch`), and `Handoff` moves them into the
    `Llama`'s single-stream cache; each sequence is still held to `n_ctx_seq` tokens, as
    the `Llama` holds one prompt.

    Scheduling is continuous: a sequence that finishes frees its slot and the next prompt's
    tokens enter the very next `llama_decode`, alongside the other sequences' next tokens.
    Each sequence reads its own logits row (`llama_get_logits_ith` at the index of its last
    token in the batch); the greedy token is the first argmax, as llama.cpp's greedy
    sampler picks it. Each step's wall time is split across the sequences in it in
    proportion to the tokens each fed, so a prompt's `seconds` carry its prompt processing.
    """

    def __init__(self, llm: Any, n_seq: int, n_ctx_seq: int, n_threads: int) -> None:
        import llama_cpp

        self.llm = llm
        self.n_seq = n_seq
        self.n_ctx_seq = n_ctx_seq
        # A step may hold several whole prompts; llama.cpp splits it into n_ubatch pieces.
        self.ctx = _sequences_context(
            llm, n_seq, n_seq * n_ctx_seq, n_seq * n_ctx_seq, n_threads,
            f"{n_seq} parallel sequences of {n_ctx_seq} tokens; lower --parallel",
        )
        self.vocab = llm._model.vocab
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        self.root = n_seq
        self.capacity = n_seq * n_ctx_seq
        self.batch = llama_cpp.llama_batch_init(self.capacity, 0, 1)

    def _decode_shared_prefix(self, streams: list[_Stream], memory: Any) -> int:
        """Decode the prompts' common leading tokens once, into sequence `root`; their length.

        Every prompt of one model starts with the same template (the chat system prompt, the
        few-shot preamble), which the sequential path also decodes once: llama-cpp-python
        keeps it from the previous prompt. Each sequence then starts as a copy of `root`
        (`llama_memory_seq_cp`, which in a unified cache only tags the cells) and decodes
        the rest of its prompt. Its time is shared equally by the prompts.
        """
        import llama_cpp

        if len(streams) < 2:
            return 0
        first = streams[0].prompt
        # At least one token of every prompt is left to decode, for its logits.
        length = min(len(shared_prefix([s.prompt for s in streams])), min(len(s.prompt) for s in streams) - 1)
        if length <= 0:
            return 0
        start = time.perf_counter()
        batch = self.batch
        for i, token in enumerate(first[:length]):
            _put(batch, i, token, i, self.root, False)
        batch.n_tokens = length
        rc = llama_cpp.llama_decode(self.ctx, batch)
        if rc != 0:
            raise BackendError(f"llama.cpp could not decode the prompts' shared prefix (llama_decode returned {rc})")
        share = (time.perf_counter() - start) / len(streams)
        for s in streams:
            s.seconds += share
        return length

    def close(self) -> None:
        import llama_cpp

        if self.ctx is not None:
            llama_cpp.llama_batch_free(self.batch)
            llama_cpp.llama_free(self.ctx)
            self.ctx = None

    def run(
        self,
        prompts: Sequence[Rendered],
        params: Sequence[GenParams],
        keep: dict[str, "Handoff"] | None = None,
        letters: dict[int, int] | None = None,
    ) -> list[Generation | CreError]:
        """Greedy completions of `prompts` (rendered); an entry is an error for a prompt
        that does not fit the per-sequence context (as `LlamaBackend.complete` raises it).

        With `keep`, each finished sequence's KV cells are copied out into it, by rendered
        text, before its slot is reused (see `Handoff`)."""
        import numpy as np
        import llama_cpp

        llm = self.llm
        results: list[Generation | CreError] = [BackendError("not decoded")] * len(prompts)
        queue: deque[_Stream] = deque()
        for i, (rendered, p) in enumerate(zip(prompts, params)):
            tokens = prompt_tokens(llm, rendered)
            room = self.n_ctx_seq - len(tokens)
            if room <= 0:
                results[i] = PromptTooLong(
                    f"prompt is {len(tokens)} tokens, which fills {self.n_ctx_seq}-token context; "
                    "shorten it or raise `context` in models.toml"
                )
                continue
            stops = [s.encode("utf-8") for s in p.stop]
            queue.append(_Stream(i, tokens, min(p.max_tokens, room) if p.max_tokens > 0 else room, stops,
                                 meter=SignalMeter(letters) if letters is not None else None))
        memory = llama_cpp.llama_get_memory(self.ctx)
        llama_cpp.llama_memory_clear(memory, True)
        shared = self._decode_shared_prefix(list(queue), memory)
        free = list(range(self.n_seq - 1, -1, -1))
        active: list[_Stream] = []
        batch = self.batch
        while queue or active:
            start = time.perf_counter()
            while queue and free:
                stream = queue.popleft()
                stream.seq = free.pop()
                if shared:
                    llama_cpp.llama_memory_seq_cp(memory, self.root, stream.seq, -1, -1)
                stream.n_past = shared
                stream.feed = stream.prompt[shared:]
                active.append(stream)
            n = 0
            rows: list[int] = []
            for stream in active:
                for j, token in enumerate(stream.feed):
                    _put(batch, n, token, stream.n_past + j, stream.seq, j == len(stream.feed) - 1)
                    n += 1
                rows.append(n - 1)
            batch.n_tokens = n
            rc = llama_cpp.llama_decode(self.ctx, batch)
            if rc != 0:
                raise BackendError(f"llama.cpp could not decode {len(active)} parallel sequences (llama_decode returned {rc})")
            fed = [len(stream.feed) for stream in active]
            still: list[_Stream] = []
            finished: list[tuple[_Stream, bytes, str]] = []
            for stream, row in zip(active, rows):
                stream.n_past += len(stream.feed)
                logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self.ctx, row), shape=(self.n_vocab,))
                if stream.meter is not None:
                    stream.meter.observe(logits)
                done = _take(llm, self.vocab, stream, int(np.argmax(logits)), self.n_ctx_seq)
                if done is None:
                    still.append(stream)
                else:
                    finished.append((stream, *done))
            # Each step's wall time is shared by the sequences in it, in proportion to the
            # tokens each fed: a prompt's first step carries its prompt processing.
            elapsed = time.perf_counter() - start
            total = sum(fed)
            for stream, k in zip(active, fed):
                stream.seconds += elapsed * k / total
            for stream, text, reason in finished:
                if keep is not None:
                    keep[prompts[stream.index].text] = Handoff.save(self.ctx, stream.seq, (stream.prompt + stream.out)[: stream.n_past])
                llama_cpp.llama_memory_seq_rm(memory, stream.seq, -1, -1)
                free.append(stream.seq)
                results[stream.index] = Generation(
                    text=text.decode("utf-8", errors="ignore"),
                    prompt_tokens=len(stream.prompt),
                    output_tokens=len(stream.out),
                    seconds=stream.seconds,
                    finish_reason=reason,
                    signals=stream.meter.signals() if stream.meter is not None else None,
                )
            active = still
        return results


# Sequences the votes context holds at first: the 4 sampled votes of a k=5 check.
VOTE_SEQUENCES = 4


def sampler_chain(params: GenParams) -> Any:
    """The sampler chain llama-cpp-python's `create_completion` builds for `complete`'s
    settings at temperature > 0: top-k, typical (1.0: a no-op), top-p, min-p 0, temperature,
    and a draw seeded with `params.seed`. (Its repeat-penalty sampler, at 1.0, changes nothing.)"""
    import llama_cpp

    chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
    for sampler in (
        llama_cpp.llama_sampler_init_top_k(params.top_k),
        llama_cpp.llama_sampler_init_typical(1.0, 1),
        llama_cpp.llama_sampler_init_top_p(params.top_p, 1),
        llama_cpp.llama_sampler_init_min_p(0.0, 1),
        llama_cpp.llama_sampler_init_temp(params.temperature),
        llama_cpp.llama_sampler_init_dist(params.seed if params.seed is not None else llama_cpp.LLAMA_DEFAULT_SEED),
    ):
        llama_cpp.llama_sampler_chain_add(chain, sampler)
    return chain


class ParallelVotes:
    """The sampled votes of one prompt, decoded as parallel sequences over its KV cells.

    The prompt's cells come from the `Llama`, which holds them after the greedy vote
    (`llama_state_seq_get_data`/`set_data` into sequence `root`, the reverse of `Handoff`);
    only when it does not are they decoded here. Each vote's sequence starts as a copy of
    `root` up to the prompt's last token, which every sequence then decodes for its own
    first logits, in one batch; from there each step decodes one token per live sequence.
    Each sequence samples with its own chain (`sampler_chain`). A step's wall time is split
    across its sequences as `ParallelGreedy` splits it.
    """

    def __init__(self, llm: Any, n_seq: int, n_ctx: int, n_threads: int) -> None:
        import llama_cpp

        self.llm = llm
        self.n_seq = n_seq
        self.n_ctx = n_ctx
        # The prompt once, plus every sequence's answer: at most the Llama's own context in all.
        self.ctx = _sequences_context(llm, n_seq, 2 * n_ctx, max(n_ctx, n_seq), n_threads, f"{n_seq} parallel votes")
        self.vocab = llm._model.vocab
        self.root = n_seq
        self.batch = llama_cpp.llama_batch_init(max(n_ctx, n_seq), 0, 1)
        self.held: list[int] = []  # the tokens `root` holds

    def close(self) -> None:
        import llama_cpp

        if self.ctx is not None:
            llama_cpp.llama_batch_free(self.batch)
            llama_cpp.llama_free(self.ctx)
            self.ctx = None

    def _load_prompt(self, tokens: list[int]) -> float:
        """Make `root` hold `tokens[:-1]`; the seconds it took."""
        import llama_cpp

        head = tokens[:-1]
        if self.held == head:
            return 0.0
        start = time.perf_counter()
        memory = llama_cpp.llama_get_memory(self.ctx)
        llama_cpp.llama_memory_clear(memory, True)
        self.held = []
        llm = self.llm
        n = len(head)
        if llm.n_tokens >= n and list(llm.input_ids[:n]) == head:
            cells = Handoff.save(llm._ctx.ctx, 0, list(llm.input_ids[: llm.n_tokens]))
            if llama_cpp.llama_state_seq_set_data(self.ctx, cells.data, len(cells.data), self.root):
                llama_cpp.llama_memory_seq_rm(memory, self.root, n, -1)
                self.held = head
                return time.perf_counter() - start
            llama_cpp.llama_memory_clear(memory, True)
        batch = self.batch
        for i, token in enumerate(head):
            _put(batch, i, token, i, self.root, False)
        batch.n_tokens = n
        if n and llama_cpp.llama_decode(self.ctx, batch) != 0:
            raise BackendError("llama.cpp could not decode the prompt for its votes")
        self.held = head
        return time.perf_counter() - start

    def run(self, tokens: list[int], params: Sequence[GenParams]) -> list[Generation]:
        import llama_cpp

        llm = self.llm
        memory = llama_cpp.llama_get_memory(self.ctx)
        share = self._load_prompt(tokens) / len(params)
        n_prompt = len(tokens)
        streams: list[_Stream] = []
        chains = []
        for i, p in enumerate(params):
            room = self.n_ctx - n_prompt
            stream = _Stream(i, tokens, min(p.max_tokens, room) if p.max_tokens > 0 else room,
                             [s.encode("utf-8") for s in p.stop], seq=i, n_past=n_prompt - 1, feed=[tokens[-1]])
            stream.seconds = share
            llama_cpp.llama_memory_seq_rm(memory, i, -1, -1)
            llama_cpp.llama_memory_seq_cp(memory, self.root, i, -1, -1)
            streams.append(stream)
            chains.append(sampler_chain(p))
        results: list[Generation | None] = [None] * len(params)
        active = list(streams)
        batch = self.batch
        try:
            while active:
                start = time.perf_counter()
                for n, stream in enumerate(active):
                    _put(batch, n, stream.feed[0], stream.n_past, stream.seq, True)
                batch.n_tokens = len(active)
                rc = llama_cpp.llama_decode(self.ctx, batch)
                if rc != 0:
                    raise BackendError(f"llama.cpp could not decode {len(active)} parallel votes (llama_decode returned {rc})")
                still = []
                finished: list[tuple[_Stream, bytes, str]] = []
                for row, stream in enumerate(active):
                    stream.n_past += 1
                    token = int(llama_cpp.llama_sampler_sample(chains[stream.index], self.ctx, row))
                    done = _take(llm, self.vocab, stream, token, self.n_ctx)
                    if done is None:
                        still.append(stream)
                    else:
                        finished.append((stream, *done))
                # Every sequence fed one token: the step's time is shared equally.
                elapsed = (time.perf_counter() - start) / len(active)
                for stream in active:
                    stream.seconds += elapsed
                for stream, out, reason in finished:
                    results[stream.index] = Generation(
                        text=out.decode("utf-8", errors="ignore"), prompt_tokens=n_prompt,
                        output_tokens=len(stream.out), seconds=stream.seconds, finish_reason=reason,
                    )
                    llama_cpp.llama_memory_seq_rm(memory, stream.seq, -1, -1)
                active = still
        finally:
            for chain in chains:
                llama_cpp.llama_sampler_free(chain)
        return [r for r in results if r is not None]


def _probe_main(argv: Sequence[str]) -> None:
    """Child side of `probe`: load the file and run a short greedy decode."""
    from crecli.config import ModelSpec

    path, context, n_gpu_layers = argv[0], int(argv[1]), int(argv[2])
    spec = ModelSpec(name=Path(path).name, path=path, context=context, n_gpu_layers=n_gpu_layers)
    backend = LlamaBackend(spec)
    try:
        llm = backend.llm
        llm.reset()
        llm.eval(llm.tokenize(b"The capital of France is", add_bos=True))
        for _ in range(4):
            llm.eval([llm.sample(temp=0.0)])
    finally:
        backend.close()


if __name__ == "__main__":
    _probe_main(sys.argv[1:])
