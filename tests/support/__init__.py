"""Plain helpers and constants the test modules share; the shared fixtures are in conftest.py.

Test modules import from here, never from each other. Nothing here is collected as a test,
and nothing here runs at import beyond defining constants, so bench/ scripts may import it
too (they put tests/ on sys.path):

- `ladder`: the fake three-rung ladder (small, medium, large) and scripted fake answers;
- `routers`: the in-memory topics router, the router `fit.build` assembles, and editing
  a saved router file's zip members;
- `prompts`: prompts, vote tables and canned traces of the batch, serve and log tests;
- `serving`: a live `cre serve` in a thread;
- `logs`: the small example query log;
- `replays`: labelled logs prepared for replay (`replay.Data`) from synthetic outcomes;
- `hostile`: `cre` runs through `cli.main()` and the checks the hostile-use tests make;
- `batch_child`: `cre batch` on the fake ladder in a process of its own (signals, a real stdout);
- `real`: what the real-model tests accept where CPUs round differently;
- `fake_openai`: a real OpenAI-compatible HTTP server in a thread: canned answers with
  log-probabilities in each server's shape, streams, and the faults engines show;
- `fake_llama`: a llama-cpp-python `Llama` without a model: byte-piece tokens and its
  completion loop over a scripted answer, for `LlamaBackend`'s answering path;
- `engines`: real serving engines (llama-server, llama-cpp-python's server) for the tests
  marked `real` and bench/serve_load.py --engine;
- `scale`: the fake ladder with rungs on such servers, slow and streaming fakes, clients
  sending at once;
- `waiting`: polling for a condition with a generous deadline, in place of a fixed sleep.
"""
