"""CS336 assignment 1: a byte-level BPE tokenizer and a Transformer language model, from scratch."""


def __getattr__(name: str) -> str:
    """`__version__` on demand: reading package metadata costs about 0.15 s, which every CLI start would pay."""
    if name != "__version__":
        raise AttributeError(f"module 'cs336_basics' has no attribute {name!r}")
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("cs336-basics")
    except PackageNotFoundError:  # used from a source tree via PYTHONPATH (e.g. on a GPU node)
        return "0+source"
