"""Planner: profile the machine, measure acceptance, choose the tree and the resident layers."""
