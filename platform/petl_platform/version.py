"""The library version, recorded in every adapter artifact and MLmodel (a leaf module: anything may import it)."""

__version__ = "0.1.0"
