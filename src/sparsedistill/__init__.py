"""sparsedistill: distill dense teachers into sparse students that are really faster."""

__version__ = "0.1.0"
