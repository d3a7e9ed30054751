"""The test suite's own rules (conftest.py): numba's cache is a folder of the test session,
never the user's cache."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def test_numba_caches_in_a_folder_of_the_test_session() -> None:
    import numba.core.config
    import platformdirs

    cache = Path(os.environ["NUMBA_CACHE_DIR"])
    assert numba.core.config.CACHE_DIR == str(cache)  # numba read it at import, after conftest set it
    assert cache.is_relative_to(tempfile.gettempdir()), cache
    assert not cache.is_relative_to(platformdirs.user_cache_dir()), cache
