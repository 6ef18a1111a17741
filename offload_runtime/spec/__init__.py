"""Speculation: sampling, the tree search, the verifiers and the methods that pair drawing with verifying."""
