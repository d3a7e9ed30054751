"""The test suite's own rules (conftest.py): a test that uses the user's real models must be
marked `real`, so that `pytest -m "not real"` never loads one; and numba's cache is a folder
of the test session, never the user's cache."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

TESTS = Path(__file__).resolve().parent

PROBE = '''
import pytest


def test_unmarked(real_models):
    pass


@pytest.mark.real
def test_marked(real_models):
    pass
'''


def test_a_test_using_real_models_without_the_real_marker_fails(tmp_path: Path) -> None:
    """A pytest run, in a child process, of this suite's conftest and one file holding an
    unmarked and a marked user of `real_models` (neither touches a model)."""
    shutil.copy(TESTS / "conftest.py", tmp_path / "conftest.py")
    shutil.copytree(TESTS / "support", tmp_path / "support", ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "pytest.ini").write_text("[pytest]\nmarkers =\n    real: loads a real model\n")
    (tmp_path / "test_probe.py").write_text(PROBE)
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300)
    out = run.stdout + run.stderr
    assert run.returncode == 1, out
    # The unmarked test fails in the fixture, before it could load anything; the marked one runs.
    assert "1 passed, 1 error" in out and "ERROR at setup of test_unmarked" in out, out
    assert "test_probe.py::test_unmarked uses the user's real models but is not marked `real`" in out, out


def test_numba_caches_in_a_folder_of_the_test_session() -> None:
    import numba.core.config
    import platformdirs

    cache = Path(os.environ["NUMBA_CACHE_DIR"])
    assert numba.core.config.CACHE_DIR == str(cache)  # numba read it at import, after conftest set it
    assert cache.is_relative_to(tempfile.gettempdir()), cache
    assert not cache.is_relative_to(platformdirs.user_cache_dir()), cache
