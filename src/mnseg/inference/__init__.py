"""Prediction: the sliding window over a volume (``window``) and a trained run applied to scans (``predict``)."""
