"""offload-runtime: layer-streamed offloading of Llama-family models, verified by Sequoia token trees."""
