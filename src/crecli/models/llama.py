"""The llama.cpp backend, through llama-cpp-python, and its crash probe.

The model loads on first use, not at construction, so building a ladder is free and only
the rungs a query reaches cost memory. `n_threads` defaults to the core count
(`runtime.default_threads`): llama.cpp's threads spin while they wait, so more threads
than cores (or another process computing beside) collapses throughput.

A single answer goes through llama-cpp-python's single-sequence `Llama`, which keeps what
the previous prompt shares with the next; a cluster's answered examples are restored from
snapshots of their KV cells (`_warm_prefix`). The greedy answers of many prompts (`cre
batch --parallel`) and one prompt's sampled votes are decoded as parallel sequences of a
second context on the same loaded model (`models/parallel.py`). Every path feeds the
model the tokens `models/tokens.py` makes of a rendered prompt.

`probe` loads a model and decodes a few tokens in a child process (`python -m
crecli.models.llama`), so that a native crash becomes an error naming its cause and fix.
"""

from __future__ import annotations

import codecs
import os
import signal
import subprocess
import sys
import time
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from crecli import cancel
from crecli.config import IN_PROCESS_REPEAT_PENALTY
from crecli.errors import BackendError, CreError, ModelLoadError
from crecli.models.backend import Backend, Generation, GenParams, StopSafeEmitter, context_room
from crecli.models.gguf import kv_bytes_per_token
from crecli.models.parallel import VOTE_SEQUENCES, Handoff, ParallelGreedy, ParallelVotes
from crecli.models.prompting import Rendered
from crecli.models.pull import require_file
from crecli.models.runtime import CRASH_HINT, abort_on_cancel, default_threads, loading, model_params, use_extra_bufts
from crecli.models.tokens import (
    SignalMeter, decided_by, decoded_output, letter_tokens, prompt_head, prompt_tokens, shared_prefix,
)

if TYPE_CHECKING:
    from crecli.config import ModelSpec


# Snapshots of answered examples' KV cells kept per loaded model (`LlamaBackend._warm_prefix`).
# One holds a cluster's head and examples, about 100-400 tokens: 1-5 MB on the 0.5B and
# 3-11 MB on the 1.5B (KV bytes per token from their GGUF headers).
PREFIX_SNAPSHOTS = 16


# Seconds a model file llama.cpp refused to load is not tried again, unless it changes.
REFUSED_RETRY_SECONDS = 60.0


# llama-cpp-python's `embed(truncate=True)` cuts a text to the context's batch, which it
# keeps at most the context: a text is embedded by its first min(context, EMBED_BATCH)
# tokens. Passed as `n_batch` when loading to embed (llama-cpp-python's own default, made
# explicit here so that it has one home): cached vectors are keyed by it (`embed_truncation`).
EMBED_BATCH = 512


def embed_truncation(context: int) -> int:
    """How many tokens of a text a model loaded with `context` embeds; the rest is cut off."""
    return min(context, EMBED_BATCH)


class AnswerText:
    """An answer's text as its tokens come, each token detokenized once.

    `more` returns what `detokenize(answer).decode("utf-8", "ignore")` of the whole answer
    so far adds to its last result: the bytes of a character split across tokens wait in an
    incremental decoder for the token that completes it (the whole decode drops them till
    then), and bytes that never make a character are dropped as that decode drops them.
    Decoding the whole answer again at every token cost an answer of n tokens n^2/2 token
    lookups (two million for 2,000 tokens) on top of the decode itself. (llama-cpp-python's
    own completion loop still detokenizes the whole answer at each token, for its stop
    checks: its cost, which this path no longer doubles.)

    The `detokenize` of a GGUF vocabulary's tokenizer (llama-cpp-python's `LlamaTokenizer`,
    which ignores `prev_tokens`) joins its tokens' pieces, but for one rule: a list that
    starts with BOS loses the space its text starts with. So until the answer's text has a
    first byte, the answer is detokenized from its start; after that, each new token alone.
    """

    def __init__(self, llm: Any) -> None:
        self.llm = llm
        self.n = 0  # answer tokens detokenized
        self.begun = False  # whether the answer's text has its first byte
        self.utf8 = codecs.getincrementaldecoder("utf-8")("ignore")

    def more(self, answer: Sequence[int]) -> str:
        """The text that `answer`, every token generated so far, adds to earlier calls' text."""
        if len(answer) <= self.n:
            return ""
        if self.begun:
            raw = b"".join(self.llm.detokenize([t]) for t in answer[self.n:])
        else:
            raw = self.llm.detokenize(list(answer))
            self.begun = bool(raw)
        self.n = len(answer)
        return self.utf8.decode(raw)


class OptionEnd:
    """Ends a greedy answer at its option letter (`GenParams.option_letters`), before the token
    that decides it is decoded.

    llama-cpp-python asks its stopping criteria after sampling a token and before feeding it
    to the model, but shows them only the tokens fed so far. So `observe` reads each step's
    greedy token (the argmax of its logits, with no penalty to move it) and the criterion
    judges the answer with it (`grading.decided_option`). The deciding token is never fed:
    the answer's output tokens are the decode steps it took, 0 for the 1.5B's "(B".
    """

    def __init__(self, llm: Any, n_prompt: int, letters: str) -> None:
        self.llm, self.n_prompt, self.letters = llm, n_prompt, letters
        self.token: int | None = None  # the greedy token of the step last observed
        self.text: str | None = None  # the decided answer, once it is

    def observe(self, logits: Any) -> None:
        import numpy as np

        self.token = int(np.argmax(logits))

    def __call__(self, ids: Any, logits: Any) -> bool:
        # Asked once more after the loop ends; a decided answer stays decided.
        if self.text is None and self.token is not None:
            self.text = decided_by(self.llm.detokenize([*ids[self.n_prompt:], self.token]), self.letters)
        return self.text is not None


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
        self._vocab: Any = None  # a vocabulary-only Llama, to count tokens without the weights
        self._embedder: Any = None
        self._parallel: ParallelGreedy | None = None
        self._votes: ParallelVotes | None = None
        self._handoff: dict[str, Handoff] = {}  # rendered prompt -> its cells from the last wave
        # Answered examples -> the KV cells of the tokens every prompt shown them starts with
        # (`_warm_prefix`), most recently used last; and those tokens, per set of examples.
        self._prefixes: OrderedDict[tuple[tuple[str, str], ...], Handoff] = OrderedDict()
        self._prefix_tokens: dict[tuple[tuple[str, str], ...], list[int]] = {}
        # The snapshots' bytes, kept as they change: `cache_memory` is read by the model pool
        # from another request's thread, and iterating `_prefixes` while this model's request
        # reorders it raised "OrderedDict mutated during iteration".
        self._prefix_bytes = 0
        self._votes_bytes = 0  # the votes context's KV cache, while it exists
        self.prefix_restores = 0  # prompts whose examples came from a snapshot
        self._letters: dict[int, int] | None = None
        # Greedy answers carry `Signals`; off only to measure what reading them costs.
        self.read_signals = True
        self.load_seconds = 0.0
        # The last load llama.cpp refused: ((size, mtime_ns, embedding), when, its message).
        self._refused: tuple[tuple[int, int, bool], float, str] | None = None

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
        # A file llama.cpp refused is not tried again for REFUSED_RETRY_SECONDS unless it
        # changes: `cre serve` passes over such a rung, and each request that reached it paid
        # a failed load (seconds for a large corrupt file). Out of memory may pass, so not for good.
        key = self._file_key(path, embedding)
        standing = self._standing_refusal(key)
        if standing is not None:
            raise ModelLoadError(standing)
        start = time.perf_counter()
        try:
            with loading() as verbose, model_params(use_extra_bufts()):
                llm = Llama(
                    model_path=str(path),
                    n_ctx=self.n_ctx,
                    n_threads=self.n_threads,
                    n_threads_batch=self.n_threads,
                    n_gpu_layers=self.n_gpu_layers,
                    embedding=embedding,
                    # Mean pooling: decoder models have no CLS token worth reading. The batch
                    # decides how much of a text is embedded (`embed_truncation`).
                    **({"pooling_type": 1, "n_batch": EMBED_BATCH} if embedding else {}),
                    verbose=verbose,
                )
        except Exception as exc:  # llama.cpp reports load failures as bare ValueErrors
            message = f"llama.cpp could not load {self.spec.name!r} from {path}: {exc}"
            self._refused = (key, time.monotonic(), message)
            raise ModelLoadError(message) from exc
        # No warm-up decode: llama.cpp reserves its compute buffers when the context is made,
        # and a one-token decode right after loading took as long as a second one (0.095 s on
        # the 1.5B) while the first real answer took no longer without it; it cost every
        # `cre ask` a token's compute for nothing.
        self.load_seconds += time.perf_counter() - start
        return llm

    @staticmethod
    def _file_key(path: Path, embedding: bool) -> tuple[int, int, bool]:
        """What a refusal is remembered with: the file's size and mtime, and which load it was."""
        info = path.stat()
        return (info.st_size, info.st_mtime_ns, embedding)

    def _standing_refusal(self, key: tuple[int, int, bool]) -> str | None:
        """The message of the load llama.cpp refused of the file `key` names, while it stands
        (REFUSED_RETRY_SECONDS); None otherwise. The one rule `_load` and `refusal` share."""
        refused = self._refused
        if refused is not None and refused[0] == key and time.monotonic() - refused[1] < REFUSED_RETRY_SECONDS:
            return refused[2]
        return None

    def refusal(self) -> str | None:
        """The refused load of this model's file that stands now (`cre serve`'s /health: the
        rung cannot answer until it is tried again); None when none does."""
        if self._refused is None or self.spec.file is None:
            return None
        try:
            return self._standing_refusal(self._file_key(self.spec.file, False))
        except OSError:  # gone or unreadable: /health says so from the file itself
            return None

    @property
    def llm(self) -> Any:
        if self._llm is None:
            self._llm = self._load()
        return self._llm

    def _fit_max_tokens(self, n_prompt: int, wanted: int) -> int:
        return min(wanted, context_room(n_prompt, self.n_ctx, self.spec.name))

    def count_tokens(self, rendered: Rendered) -> int:
        return len(prompt_tokens(self._tokenizer(), rendered))

    def text_tokens(self, text: str) -> Sequence[int]:
        # special=False: user text never becomes control tokens.
        return self._tokenizer().tokenize(text.encode("utf-8"), add_bos=False, special=False)

    def _tokenizer(self) -> Any:
        """The loaded model, else the model's vocabulary alone (`vocab_only`: no weights, a
        fraction of a second), so counting tokens never loads a model just to count."""
        if self._llm is not None:
            return self._llm
        if self._vocab is None:
            from llama_cpp import Llama

            path = require_file(self.spec)
            try:
                with loading() as verbose:
                    self._vocab = Llama(model_path=str(path), vocab_only=True, verbose=verbose)
            except Exception as exc:  # a bare ValueError, as `_load` meets them
                # A CreError, which the batch summary's estimate catches: a strongest model
                # llama.cpp cannot read ended a finished batch with a traceback.
                raise ModelLoadError(f"llama.cpp could not read the vocabulary of {self.spec.name!r} "
                                     f"from {path}: {exc}") from exc
        return self._vocab

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
            self._prefix_bytes -= len(self._prefixes.pop(shots).data)
        # Decode the prefix after what the cache already shares with it (usually the head).
        common = len(shared_prefix([list(llm.input_ids[: llm.n_tokens]), prefix]))
        memory = llama_cpp.llama_get_memory(llm._ctx.ctx)
        if not llama_cpp.llama_memory_seq_rm(memory, -1, common, -1):
            # Some caches (sliding-window attention) cannot drop a tail: start afresh.
            llama_cpp.llama_memory_clear(memory, True)
            common = 0
        llm.n_tokens = common
        llm.eval(prefix[common:])
        saved = self._prefixes[shots] = Handoff.save(llm._ctx.ctx, 0, prefix)
        self._prefix_bytes += len(saved.data)
        while len(self._prefixes) > PREFIX_SNAPSHOTS:
            self._prefix_bytes -= len(self._prefixes.popitem(last=False)[1].data)

    def generate_streaming(self, prompt: str, params: GenParams, emit: Callable[[str], None]) -> Generation:
        """`generate`, handing the answer's text to `emit` as tokens are generated (each one a
        step late: the logits processor sees a token when the next is computed); the same
        decode as `generate`, so the same answer, tokens and signals."""
        return self.complete(*self.prepare(prompt, params), emit=emit)

    def complete(self, rendered: Rendered, params: GenParams, emit: Callable[[str], None] | None = None) -> Generation:
        # In `cre serve`, a request that gives up (its client left, its timeout passed) stops
        # its decode where it stands: mid-prompt through llama.cpp's abort callback, between
        # tokens through a stopping criterion; rather than holding the model to the end of a
        # long prompt or to `max_tokens` for an answer nobody reads.
        token = cancel.current()
        llm = self.llm
        with abort_on_cancel(llm._ctx.ctx, token):
            return self._complete(llm, rendered, params, emit, token)

    def _complete(self, llm: Any, rendered: Rendered, params: GenParams, emit: Callable[[str], None] | None,
                  token: "cancel.Token | None") -> Generation:
        tokens = prompt_tokens(llm, rendered)
        n_prompt = len(tokens)
        start = time.perf_counter()
        handoff = self._handoff.pop(rendered.text, None)
        if handoff is not None:
            handoff.restore(llm)
        elif params.shots:
            self._warm_prefix(params.shots)
        meter = SignalMeter(self.letters) if params.temperature == 0.0 and params.signals and self.read_signals else None
        ending = OptionEnd(llm, n_prompt, params.ends_at) if params.ends_at else None
        processors = None
        streamed = None
        if meter is not None or emit is not None or ending is not None:
            from llama_cpp import LogitsProcessorList

            streamed = StopSafeEmitter(params.stop, emit) if emit is not None else None
            answer = AnswerText(llm)

            def observe(ids: Any, scores: Any) -> Any:
                if meter is not None:
                    meter.observe(scores)
                if ending is not None:
                    ending.observe(scores)
                if streamed is not None and len(ids) > n_prompt:
                    # The text of the tokens generated since the last step: whole characters only.
                    streamed.add(answer.more(ids[n_prompt:]))
                return scores

            processors = LogitsProcessorList([observe])
        # Stopping between tokens leaves the Llama's tokens and its KV cache in step, so the
        # next prompt reuses them as usual.
        criteria: list[Callable[[Any, Any], bool]] = []
        if token is not None:
            criteria.append(lambda ids, logits: token.is_set())
        if ending is not None:
            criteria.append(ending)
        stopping = None
        if criteria:
            from llama_cpp import StoppingCriteriaList

            stopping = StoppingCriteriaList(criteria)
        # Tokens, not text: llama-cpp-python would tokenize a string with special tokens
        # parsed, user text included (`tokenize`).
        out = llm.create_completion(
            tokens,
            max_tokens=self._fit_max_tokens(n_prompt, params.max_tokens),
            temperature=params.temperature,
            top_p=params.top_p,
            top_k=params.top_k,
            min_p=0.0,
            repeat_penalty=IN_PROCESS_REPEAT_PENALTY,
            seed=params.seed,
            stop=list(params.stop) or None,
            logits_processor=processors,
            stopping_criteria=stopping,
        )
        cancel.check()
        seconds = time.perf_counter() - start
        choice = out["choices"][0]
        usage = out.get("usage", {})
        # A decided option answer: what was fed, then the deciding token and its ")".
        text = ending.text if ending is not None and ending.text is not None else choice["text"]
        if streamed is not None:
            streamed.finish(text)  # the last token, which no later step showed
        finish = str(choice.get("finish_reason") or "stop")
        return Generation(
            text=text,
            prompt_tokens=int(usage.get("prompt_tokens", n_prompt)),
            # The Llama's context holds the prompt and the answer tokens fed after it; usage
            # counts a token that ended the answer on a stop string too (`decoded_output`).
            output_tokens=decoded_output(int(usage.get("completion_tokens", 0)), llm.n_tokens - n_prompt, finish),
            seconds=seconds,
            finish_reason=finish,
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
            self._parallel = ParallelGreedy(llm, parallel, self.n_ctx, self.n_threads, self.spec.name)
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
            # Its KV cache (2 x n_ctx cells, `ParallelVotes`) counts against --memory-budget
            # from now on (`cache_memory`): `cre serve` loads models at parallel 1, whose cost
            # leaves it out. Sized first: a header it cannot size left a context made and
            # counted as nothing.
            size = self._kv_bytes(2 * self.n_ctx)
            self._votes = ParallelVotes(llm, max(len(params), VOTE_SEQUENCES), self.n_ctx, self.n_threads)
            self._votes_bytes = size
        return self._votes.run(tokens, [p for _, p in prepared], self._handoff.pop(rendered.text, None))

    def _close_votes(self) -> None:
        if self._votes is not None:
            self._votes.close()
            self._votes = None
        self._votes_bytes = 0

    def cache_memory(self) -> int:
        """The snapshots of answered examples' KV cells kept for reuse (`_warm_prefix`), and
        the sampled votes' context once one exists."""
        return self._prefix_bytes + self._votes_bytes

    def parallel_memory(self, parallel: int) -> int:
        """The KV cache of the parallel context: `parallel` sequences of `n_ctx` tokens.

        From the GGUF header (layers, KV heads, key and value widths) at 16-bit K and V,
        llama.cpp's default cache type (a unified cache keeps sliding-window layers at full
        size too). Not counted, as for the single-sequence context: compute buffers, and the
        `Handoff` copies of a wave's prompts, which are at most one chunk's prompts' cells.
        """
        if parallel <= 1:
            return 0
        return self._kv_bytes(parallel * self.n_ctx)

    def _kv_bytes(self, cells: int) -> int:
        """What `cells` KV cells of this model hold, from its GGUF header (`kv_bytes_per_token`)."""
        return cells * kv_bytes_per_token(require_file(self.spec))

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
        self._prefix_bytes = 0
        for attr in ("_llm", "_embedder", "_vocab"):
            llm = getattr(self, attr)
            if llm is not None:
                try:
                    llm.close()
                except Exception:
                    pass
                setattr(self, attr, None)


# ---------------------------------------------------------------- the crash probe


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
    # The child runs this module (`_probe_main`), not runtime.py: it drives `LlamaBackend`,
    # which the modules below this one may not import.
    return [sys.executable, "-m", "crecli.models.llama", str(path), str(spec.context), str(spec.n_gpu_layers)]


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
