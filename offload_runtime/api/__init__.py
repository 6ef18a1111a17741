"""The Python API: Engine and what it is built from (options, loading, text, plan files, model names)."""
