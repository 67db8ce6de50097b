"""geovote: shared core of every stage: geometry, cells, OSV-5M data, metrics, reverse geocoding."""
__version__ = "0.1.0"
