"""mosaicrt: deployment toolkit for Memory Mosaics v2 language models."""

__version__ = "0.1.0"
