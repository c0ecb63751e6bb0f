"""Exceptions shared by the model code and the kernels (a leaf module: it imports nothing)."""


class Unsupported(NotImplementedError):
    """A backend cannot run this shape/config; the message says which constraint failed."""
