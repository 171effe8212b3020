"""Scoring predictions: per-case metrics with medpy semantics (``metrics``) and whole folders (``folders``)."""
