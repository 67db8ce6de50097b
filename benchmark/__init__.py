"""geovote: the benchmark stage."""
