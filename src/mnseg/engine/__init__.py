"""The training engine: everything a method does not need to know about."""
