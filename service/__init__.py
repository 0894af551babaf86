"""Bedside: encrypted-at-rest patient-physician secure messaging."""

__version__ = "0.1.0"
