"""Offline-first loaders for the datasets of the examples."""
