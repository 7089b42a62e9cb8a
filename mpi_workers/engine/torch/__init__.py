"""The built-in engine: a Llama-family decoder in plain PyTorch (CPU and GPU), paged KV cache,
continuous batching, tensor parallelism over MPI ranks, and native CPU kernels."""
