"""Flax linen modules of the cascade: video / image UNets, text encoders, VAE."""
