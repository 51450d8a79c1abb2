"""presenced: a multi-region presence daemon built on trio."""

__version__ = "0.1.0"
