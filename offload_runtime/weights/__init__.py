"""Where weights come from (checkpoints, random weights), how a layer is laid out in memory, the host store of
streamed layers, and building a model from a source."""
