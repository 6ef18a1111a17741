"""Pieces of the recipe that rebuilds the bundled demo model pair (see tools/train_demo_pair.py)."""
