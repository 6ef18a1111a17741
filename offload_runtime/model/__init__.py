"""The model: its shape (config), the forward over weights handed in (transformer), its KV cache, the tree type
and the inputs of one forward. Nothing here reads files beyond config.json or knows about offloading."""
