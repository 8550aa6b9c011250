"""Coral: two Linux servers that look like one server that never drops a TCP connection."""

__version__ = "0.1.0"
