"""The reporting layer: tables, plots and pictures, the equal-MACs comparison, `amg select`
and `amg gate`. Reads CSVs and records only: it never imports torch."""
