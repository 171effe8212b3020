"""Subcommands of the ``mnseg`` CLI, one module each (see ``mnseg.cli``)."""
