"""Helpers shared by the tests and the benchmark scripts."""
from .reference import ReferenceConvMLP

__all__ = ['ReferenceConvMLP']
