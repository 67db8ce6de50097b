"""geovote: the embed stage."""
