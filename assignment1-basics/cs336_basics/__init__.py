"""CS336 assignment 1: a byte-level BPE tokenizer and a Transformer language model, from scratch."""

from importlib.metadata import version

__version__ = version("cs336-basics")
