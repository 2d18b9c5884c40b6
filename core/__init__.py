"""Shared infrastructure that no stage owns: every stage (data_prep, train, evaluate) calls these.

    core.artifacts    output directories (ownership, locks, atomic replacement), atomic files,
                      manifests and fingerprints
    core.jsonl        append-only JSON Lines: the durable appender and the torn-line-aware reader
    core.llm_client   the OpenAI-compatible HTTP client (concurrency, retries, rate limits, keys)
    core.runtime      the model runtime: device and dtype, loading, stop tokens, the generation pad,
                      batched generation, padded batches
    core.prepared     the one reader of data_prep's output (examples, conversations), completeness checked
"""
