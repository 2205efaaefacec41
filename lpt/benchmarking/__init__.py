"""Building blocks of ``lpt bench``: what to measure, the measurements, timing, memory, FLOP counting,
random-weight models at real shapes, the results schema, tables and plots. The ``lpt bench`` stage validates its
options, puts these together and writes the results.

Modules: ``protocol`` (the typed measurement specs and the parsing of bench's lists), ``measure`` (loading a model
and timing it, or timing ``lpt prune``'s step), ``worker`` (the child process that measures one configuration, and
starting it), ``timing`` (trial statistics, synchronised timers), ``memory`` (the meter of one measured phase: reset,
then peak; the readers are ``lpt.memory``'s, which the pruning loop uses too), ``flops`` (FLOPs per token, a pure
function of the model's shapes), ``shapes`` (built-in configs and random-init models), ``schema`` (the JSON layout as
TypedDicts and a checker), ``report`` (rich tables), ``plot`` (PNG), ``env`` (hardware description), ``scaling``
(memory arithmetic at real shapes).

Only the ``lpt bench`` stage uses this package; the library never imports it.
"""
