"""User-facing errors. Anything raised as ``LptError`` is printed by the CLI as one line, exit code 2."""


class LptError(Exception):
    """A problem with the user's input or environment (not a bug in lpt)."""


class MismatchError(LptError):
    """Two artifacts (model, tokenizer, masks, adapter) do not belong together."""


class DivergedError(LptError):
    """Training produced a non-finite loss or non-finite weights; the run stops and keeps nothing."""
