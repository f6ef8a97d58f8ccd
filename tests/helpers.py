"""Paths the tests need before pytester moves HOME."""

from pytest_smolvm.paths import cache_dir

REAL_CACHE = cache_dir()
