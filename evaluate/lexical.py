"""Words as the lexical metrics count them: lowercased word tokens, and content words (stopwords out).

One definition for every metric that compares texts word by word: the intrinsic metrics (first-turn
diversity, intent decomposition; evaluate/intrinsic_metrics.py) and the extrinsic ones (intent
coverage's lexical fallback, unigram difference; evaluate/extrinsic/metrics.py). Torch-free.
"""

from __future__ import annotations

import re

WORD = re.compile(r"\w+(?:'\w+)?")
# NLTK's English stopwords, apostrophes dropped (the intent's fixed opening is removed separately).
STOPWORDS = frozenset("""
a about above after again against ain all am an and any are aren as at be because been before being below
between both but by can couldn d did didn do does doesn doing don down during each few for from further
had hadn has hasn have haven having he her here hers herself him himself his how i if in into is isn it
its itself just ll m ma me mightn more most mustn my myself needn no nor not now o of off on once only or
other our ours ourselves out over own re s same shan she should shouldn so some such t than that the their
theirs them themselves then there these they this those through to too under until up ve very was wasn we
were weren what when where which while who whom why will with won wouldn y you your yours yourself
yourselves""".split())


def unigrams(text: str) -> list[str]:
    """Lowercased word tokens ("don't" is one token)."""
    return WORD.findall(text.lower())


def content_words(text: str) -> set[str]:
    """The set of a text's unigrams that are not stopwords (apostrophes dropped: "don't" -> "dont")."""
    return {w.replace("'", "") for w in unigrams(text)} - STOPWORDS
