"""What the frontend, the workers and the Slurm renderer must agree on.

The ground floor of hpcserve: config schema, message schemas, block hashing, discovery and
bus clients, the deployment plan. It imports nothing else of ours.
"""
