"""Worker side of hpcserve: engines, the worker process, rank groups, KV events."""
