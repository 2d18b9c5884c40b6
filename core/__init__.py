"""Shared infrastructure that no stage owns: every stage (data_prep, train, evaluate) calls these.

    core.artifacts    output directories (ownership, locks, atomic replacement), atomic files,
                      manifests and fingerprints
    core.jsonl        append-only JSON Lines: the durable appender and the torn-line-aware reader
    core.llm_client   the OpenAI-compatible HTTP client (concurrency, retries, rate limits, keys)
"""
