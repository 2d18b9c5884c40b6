"""Every number of the paper that our tables print, in one place.

The paper: "Flipping the Dialogue: Training and Evaluating User Language Models" (Naous, Laban, Xu,
Neville; arXiv 2510.06552), the reference system's model card (microsoft/UserLM-8b), and, for the
extrinsic evaluation, the Lost-in-Conversation tasks it uses (Laban et al., arXiv 2505.06120).
docs/reproduction.md quotes each number again with its source and says what is known of how it was
measured and what we chose where it is not. The table modules (perplexity.py, intrinsic.py,
extrinsic.py, funnel.py) read them from here; a number is changed here or nowhere.
"""

from __future__ import annotations

# Held-out perplexity of user turns (the paper's perplexity table): WildChat's test split (17,943
# conversations) and PRISM (8,011), each with no intent and with the conversation's intent. Per model,
# in the columns' order of evaluate/tables/perplexity.py: WildChat no intent, WildChat intent, PRISM no
# intent, PRISM intent. Quoted in docs/reproduction.md.
PERPLEXITY = {
    "Llama3.2-1b-Base": (37.68, 29.09, 84.00, 53.54),
    "Llama3-8b-Base": (98.29, 48.13, 89.98, 40.86),
    "Llama3.2-1b-Instruct": (26.08, 16.08, 35.02, 20.80),
    "Llama3-8b-Instruct": (26.19, 21.40, 40.25, 36.29),
    "USP-8b": (32.08, 21.78, 50.91, 30.16),
    "UserLM-1b": (8.30, 7.78, 18.58, 10.33),
    "UserLM-8b": (5.60, 4.33, 14.92, 7.42),
}

# The intrinsic evaluation of user simulators (the paper's Table 2, Section 3), the rows we compare
# with, by evaluate.intrinsic's metric name (absent: not reported for that row). All in %.
# Quoted in docs/reproduction.md.
INTRINSIC = {
    "UserLM-8b": {"first_turn_diversity": 94.55, "intent_decomposition": 2.69, "dialogue_termination": 63.54,
                  "naturalness": 80.21, "role_adherence": 93.95, "intent_adherence": 94.65},
    "Llama3-8b-Instruct": {"first_turn_diversity": 81.31, "intent_decomposition": 23.95, "dialogue_termination": 3.51,
                           "naturalness": 0.20, "role_adherence": 63.25, "intent_adherence": 78.05},
    "Human": {"first_turn_diversity": 94.01, "intent_decomposition": 1.68, "naturalness": 90.15},
}

# The extrinsic evaluation (the paper's Table 3, Section 4): Lost-in-Conversation's sharded GSM8K math
# and HumanEval code tasks, 65 intents x 10 simulated conversations per simulator, GPT-4o as the
# assistant. By extrinsic.json's key in its "overall" block (evaluate/extrinsic/metrics.py). The
# paper's "turn-count range" (3.7-5.7 for GPT-4o-mini) is read as the 10th-90th percentile range:
# its two ends are turns.range_p10 and turns.range_p90. Unigram difference is a 0-1 share; the
# others are % (coverage, task score) or turns. Quoted in docs/reproduction.md.
EXTRINSIC = {
    "GPT-4o-mini user": {"intent_coverage": 86.6, "turns.variance": 0.9, "turns.range_p10": 3.7,
                         "turns.range_p90": 5.7, "unigram_difference": 0.43, "task_score": 73.2},
    "GPT-4o user": {"intent_coverage": 84.7, "turns.variance": 0.6, "turns.range_p10": 4.0,
                    "turns.range_p90": 5.4, "unigram_difference": 0.40, "task_score": 74.6},
    "UserLM-8b user": {"intent_coverage": 76.7, "turns.variance": 2.8, "turns.range_p10": 2.1,
                       "turns.range_p90": 6.7, "unigram_difference": 0.71, "task_score": 57.4},
}

# The data funnel of WildChat-1M's non-toxic release (837,989 conversations; the paper's description of
# its training data): conversations left after keeping English ones and after removing
# near-duplicates, the conversations per split (users split 90/5/5 within each country) and the
# flipped samples per split (one per user turn plus one end-of-conversation sample). Quoted in
# docs/reproduction.md.
FUNNEL = {
    "WildChat-1M": {"english": 478_498, "after_near_duplicates": 384_336,
                    "conversations.train": 343_951, "conversations.validation": 22_442, "conversations.test": 17_943,
                    "samples.train": 1_047_930, "samples.validation": 118_291, "samples.test": 137_224},
}
