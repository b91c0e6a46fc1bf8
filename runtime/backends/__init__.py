"""Backends run the four networks of the I/O contracts; the pipeline drives them all the same way."""

from sdrt.backends.base import Backend, available_backends  # noqa: F401
