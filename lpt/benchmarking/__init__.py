"""Building blocks of ``lpt bench``: timing, memory, FLOP counting, random-weight models at real shapes, the
results schema, tables and plots. The stage that puts them together is ``lpt.stages.bench``.

Modules: ``timing`` (trial statistics, synchronised timers), ``memory`` (peak allocator memory or process RSS),
``flops`` (FLOPs per token, a pure function of the model's shapes), ``shapes`` (built-in configs and
random-init models), ``schema`` (the JSON layout as TypedDicts and a checker), ``report`` (rich tables),
``plot`` (PNG), ``env`` (hardware description), ``worker`` (the child process that measures one configuration).
"""
