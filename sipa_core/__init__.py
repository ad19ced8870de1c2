"""sipa_core: the library behind the SIPA pipeline (Searching, Improving,
Pruning, Accelerating). Stage scripts in ``stages/`` are thin wrappers over it."""

__version__ = "0.1.0"
