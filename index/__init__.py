"""geovote: the index stage."""
