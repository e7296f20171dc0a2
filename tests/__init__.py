"""The test suite; a regular package so that no installed top-level `tests` package (torch-fidelity ships one)
shadows it."""
