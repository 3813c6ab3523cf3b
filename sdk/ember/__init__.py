"""Ember public SDK (lands with the platform issue)."""
