"""winback: keep inactive-customer segments from the warehouse in sync with marketing tools."""

__version__ = "0.1.0"
