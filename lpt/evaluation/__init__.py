"""Evaluation protocols behind ``lpt eval``: perplexity (``perplexity``), lm-evaluation-harness tasks (``tasks``),
and the results-file schema with its comparison table (``results``)."""
