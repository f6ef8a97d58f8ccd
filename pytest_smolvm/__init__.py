"""pytest-smolvm."""
