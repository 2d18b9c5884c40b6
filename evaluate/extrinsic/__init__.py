"""`python -m evaluate.extrinsic`: Lost-in-Conversation math and code tasks, simulated users revealing
them shard by shard to an assistant, graded, with the metrics of extrinsic.json (metrics.py)."""
