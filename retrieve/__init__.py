"""geovote: the retrieve stage."""
