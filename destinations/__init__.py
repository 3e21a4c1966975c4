"""Destination adapters: the shared base, the registry and one module per platform."""
