"""CS336 assignment 1: a byte-level BPE tokenizer and a Transformer language model, from scratch."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("cs336-basics")
except PackageNotFoundError:  # used from a source tree via PYTHONPATH (e.g. on a GPU node)
    __version__ = "0+source"
