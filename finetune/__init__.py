"""geovote: the finetune stage."""
