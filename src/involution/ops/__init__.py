"""Involution backends and their torch.library registration."""
