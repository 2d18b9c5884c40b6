"""`python -m evaluate.extrinsic`: Lost-in-Conversation math and code tasks, revealed shard by shard
to an assistant by a simulated user, graded, and scored.

Modules: `tasks` (loading and selecting LiC tasks), `grading` (answer detection and extraction,
GSM8K matching), `code_exec` (running a code answer against its tests in a separate process).
"""
