"""Canonical data schemas, importers for public formats, and row validation."""
