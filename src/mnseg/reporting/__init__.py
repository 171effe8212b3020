"""Reports: markdown/HTML comparison reports, overlay pictures, verdicts, benchmark tables and plots."""
