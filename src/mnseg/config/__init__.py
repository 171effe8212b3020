"""Configuration: the typed schema (``schema``), the checks run before training (``checks``) and the YAML presets
(``presets/``)."""
