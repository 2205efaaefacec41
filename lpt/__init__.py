"""lpt: LoRA-guided structured pruning (LoRAPrune) for decoder-only language models.

Stages exchange files on disk: calibrate -> prune -> merge / slice -> eval / bench.
Each stage is a function ``lpt.stages.<stage>.run(config) -> Path``; the CLI only builds the config.
"""

__version__ = "0.2.0"
