"""Ember's public SDK: ``from ember import llm``, then ``@llm.function``."""

from ember import llm

__all__ = ["llm"]
