"""One module per stage, each with ``run(config) -> Path``: the Python API behind every CLI command."""
