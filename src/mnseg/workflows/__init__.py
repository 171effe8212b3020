"""Whole jobs built from the engine: the label-efficiency benchmark and the embedded demo."""
