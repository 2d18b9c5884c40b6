"""Generate the embedded sample: synthetic conversations in WildChat-1M's and PRISM's exact schemas.

    python scripts/make_sample.py                 # rewrites data_prep/sample/ (checked in)
    python scripts/make_sample.py --out DIR --wildchat-rows 5000   # a bigger synthetic set

The conversations are templated English small talk about a handful of tasks (travel, cooking,
code, writing, ...), so a tiny model can learn something from them, plus every kind of row that
data_prep must handle: non-English rows, exact and near duplicates, empty user turns, a
conversation that ends on an unanswered user turn, roles out of order, control tokens in text,
toxic and redacted rows, a huge pasted turn, and a conversation with no hashed_ip. Intents are
written from the same templates (hand-written, one per task). Deterministic for a given seed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from data_prep.chat_format import INTENT_PREFIX
from data_prep.schemas import DETOXIFY_FIELDS, MODERATION_CATEGORIES, WILDCHAT_SCHEMA

SAMPLE_DIR = Path(__file__).resolve().parents[1] / "data_prep" / "sample"

PLACES = ["Algeria", "Japan", "Peru", "Norway", "Kenya", "Portugal", "Vietnam", "Canada", "Morocco", "Chile"]
DISHES = ["lentil soup", "banana bread", "chicken curry", "vegetable lasagna", "pad thai", "pancakes",
          "falafel", "beef stew", "tomato risotto", "apple pie"]
LANGUAGES = ["python", "javascript", "rust", "java", "sql", "bash", "go", "c++"]
CODE_TASKS = ["read a csv file", "sort a list of dictionaries", "reverse a string", "parse a date",
              "remove duplicates from a list", "count words in a file", "call a rest api", "merge two sorted lists"]
STORY_TOPICS = ["a lighthouse keeper", "a lost robot", "two rival chefs", "a dragon who cannot fly",
                "a detective cat", "a time traveling student", "a haunted library", "a kind pirate"]
MATH_TOPICS = ["fractions", "quadratic equations", "percentages", "derivatives", "probability",
               "the pythagorean theorem", "matrix multiplication", "logarithms"]
EMAIL_TOPICS = ["asking my manager for a day off", "complaining about a late delivery",
                "thanking a colleague", "requesting a refund", "inviting friends to a party",
                "following up after a job interview"]

TASKS = {
    "travel": dict(
        slots=PLACES,
        intent="get recommendations of places to see in {x}.",
        first=["what are the best places to visit in {x}?", "i am going to {x} next month, what should i see",
               "plan a 5 day trip to {x} for me", "top 10 things to do in {x}"],
        follow=["what about the food there?", "how many days should i stay?", "is it safe to travel alone?",
                "what is the weather like in spring?", "can you make it cheaper", "which city is best for hiking?"],
        reply=["{x} has many great places to visit. You could start with the old town, the national museum "
               "and the markets. Many travelers also enjoy the coast and the mountains.",
               "A good plan for {x} is to spend two days in the capital, then travel to the coast. "
               "Local food is excellent and public transport is affordable."]),
    "cooking": dict(
        slots=DISHES,
        intent="learn how to cook {x} at home.",
        first=["how do i make {x}?", "give me a simple recipe for {x}", "what do i need to cook {x}",
               "recipe for {x} please"],
        follow=["can i make it without an oven?", "how long does it keep in the fridge?",
                "what can i use instead of butter?", "is it healthy?", "make it for 6 people",
                "what side dish goes with it?"],
        reply=["To make {x} you need a few basic ingredients. Prepare everything first, cook it slowly "
               "over medium heat and taste as you go. Serve it warm.",
               "Here is a simple recipe for {x}: mix the ingredients, cook for about thirty minutes and "
               "let it rest before serving."]),
    "code": dict(
        slots=[f"{t} in {l}" for t in CODE_TASKS for l in LANGUAGES],
        intent="get help writing code to {x}.",
        first=["how do i {x}?", "write code to {x}", "{x}", "what is the fastest way to {x}"],
        follow=["it gives me an error", "can you explain the second line?", "make it shorter",
                "add comments please", "how do i test it?", "what if the input is empty?"],
        reply=["You can {x} with a short function. First load the input, then loop over it and collect "
               "the result. Here is an example with comments.",
               "The error means a variable is not defined yet. Move the definition above the loop and "
               "run it again."]),
    "story": dict(
        slots=STORY_TOPICS,
        intent="get a short story written about {x}.",
        first=["write a short story about {x}", "tell me a story about {x}", "can you write a story about {x} for kids",
               "short story, {x}"],
        follow=["make it longer", "add a happy ending", "now make it funny", "give it a title",
                "write it as a poem", "change the main character's name"],
        reply=["Once upon a time there was {x}. Every day brought a new adventure, and in the end "
               "everyone learned something about friendship.",
               "Here is a story about {x}. It begins on a quiet morning, when something strange happens "
               "that changes everything."]),
    "math": dict(
        slots=MATH_TOPICS,
        intent="understand {x} for a homework assignment.",
        first=["explain {x} simply", "i dont understand {x}", "help me with my homework on {x}",
               "what are {x}"],
        follow=["can you give another example?", "why does that work?", "give me a practice problem",
                "is my answer 12 correct?", "explain it like i am ten", "what is a common mistake?"],
        reply=["{x} can be understood step by step. Start with a simple example, write down what you "
               "know, and apply the rule one step at a time.",
               "Good question. With {x} the key idea is to keep both sides balanced. Let us try an example."]),
    "email": dict(
        slots=EMAIL_TOPICS,
        intent="get an email written for {x}.",
        first=["write an email {x}", "help me write an email {x}", "draft a polite email {x}",
               "email {x}, make it short"],
        follow=["make it more formal", "make it shorter", "add that i am available on monday",
                "change the tone to friendly", "write a subject line", "translate it to simple english"],
        reply=["Dear Sir or Madam, I am writing to you regarding {x}. Thank you for your time and "
               "understanding. Best regards.",
               "Subject: A quick note. Hello, I hope you are well. I wanted to reach out about {x}. Kind regards."]),
}
# A templated prompt pasted by many users with a different tail: near-duplicates of each other.
MIDJOURNEY = ("As a prompt generator for a generative AI called Midjourney, you will create image prompts "
              "for the AI to visualize. I will give you a concept, and you will provide a detailed prompt. "
              "Concept: {x}")
NON_ENGLISH = [
    ("Chinese", "你好，请帮我写一首关于{x}的诗", "好的，这是一首关于{x}的诗。"),
    ("Russian", "Привет, расскажи мне про {x}", "Конечно, вот немного информации про {x}."),
    ("Spanish", "Hola, ¿puedes ayudarme con {x}?", "Claro, aquí tienes ayuda con {x}."),
]
COUNTRIES = {"United States": (["California", "Texas", "New York"], 20),
             "India": (["Maharashtra", "Karnataka"], 16),
             "United Kingdom": (["England", "Scotland"], 12)}


def _hash(*parts: str) -> str:
    return hashlib.md5("\x1f".join(parts).encode()).hexdigest()


def _moderation(flagged: bool) -> dict:
    return {"categories": {c: flagged and c == "harassment" for c in MODERATION_CATEGORIES},
            "category_scores": {c: (0.9 if flagged and c == "harassment" else 0.001) for c in MODERATION_CATEGORIES},
            "flagged": flagged}


class WildChatWriter:
    """Builds WildChat-1M rows (the exact arrow schema) from (role, content) turns."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.rows: list[dict] = []
        self.turn_id = 10_000
        self.clock = datetime(2023, 6, 1, tzinfo=timezone.utc)
        users = [(country, self.rng.choice(states), _hash("user", country, str(i)))
                 for country, (states, n) in COUNTRIES.items() for i in range(n)]
        self.users = users

    def add(self, turns: list[tuple[str, str]], language="English", user=None, toxic=False,
            redacted=False) -> dict:
        country, state, hashed_ip = user or self.rng.choice(self.users)
        header = {"accept-language": "en-US,en;q=0.9", "user-agent": "Mozilla/5.0 (X11; Linux x86_64)"}
        self.clock += timedelta(minutes=self.rng.randint(1, 600), microseconds=self.rng.randint(0, 999_999))
        conversation = []
        for i, (role, content) in enumerate(turns):
            self.turn_id += 1
            is_user = role == "user"
            conversation.append({
                "content": content, "role": role, "language": language,
                "redacted": redacted and i == 0, "toxic": toxic and i == 0,
                "turn_identifier": self.turn_id,
                "country": country if is_user else None, "state": state if is_user else None,
                "hashed_ip": hashed_ip if is_user else None,
                "header": header if is_user else None,
                "timestamp": None if is_user else self.clock + timedelta(seconds=i),
            })
        row = {
            "conversation_hash": _hash(*(f"{r}:{c}" for r, c in turns)),
            "model": self.rng.choice(["gpt-3.5-turbo-0613", "gpt-4-0314", "gpt-4-1106-preview"]),
            "timestamp": self.clock + timedelta(seconds=len(turns)),
            "conversation": conversation,
            "turn": sum(1 for r, _ in turns if r == "user"),
            "language": language,
            "openai_moderation": [_moderation(toxic and i == 0) for i in range(len(turns))],
            "detoxify_moderation": [{f: (0.8 if toxic and i == 0 else 0.0005) for f in DETOXIFY_FIELDS}
                                    for i in range(len(turns))],
            "toxic": toxic, "redacted": redacted,
            "state": state, "country": country, "hashed_ip": hashed_ip, "header": header,
        }
        self.rows.append(row)
        return row

    def table(self) -> pa.Table:
        return pa.Table.from_pylist(self.rows, schema=WILDCHAT_SCHEMA)


OPENERS = ["", "hi, ", "hello! ", "quick question: ", "please help: ", "ok so ", "hey there. ", "good morning, ",
           "i need help. ", "so, ", "urgent: ", "my teacher asked me this. ", "for work: ", "sorry to bother you, "]
DETAILS = ["", " thanks", " please", " in simple words", " step by step", " as fast as possible",
           " for a beginner", " with examples", " thank you so much", " and keep it short"]


def _num_user_turns(rng: random.Random) -> int:
    """1 to 20 user turns, most conversations short (WildChat's mean is about 2.5)."""
    return min(20, 1 + int(rng.expovariate(0.55)))


def task_conversation(rng: random.Random, task: str, slot: str) -> tuple[list[tuple[str, str]], str]:
    spec = TASKS[task]
    turns = []
    follow = rng.sample(spec["follow"], k=len(spec["follow"]))
    for k in range(_num_user_turns(rng)):
        if k == 0:
            text = rng.choice(OPENERS) + rng.choice(spec["first"]) + rng.choice(DETAILS)
        else:
            text = follow[(k - 1) % len(follow)]
        turns.append(("user", text.format(x=slot)))
        turns.append(("assistant", rng.choice(spec["reply"]).format(x=slot)))
    return turns, f"{INTENT_PREFIX} " + spec["intent"].format(x=slot)


def make_wildchat(rng: random.Random, n_clean: int) -> tuple[pa.Table, dict[str, str]]:
    writer = WildChatWriter(rng)
    intents: dict[str, str] = {}
    clean_rows = []
    for _ in range(n_clean):
        task = rng.choice(sorted(TASKS))
        turns, intent = task_conversation(rng, task, rng.choice(TASKS[task]["slots"]))
        row = writer.add(turns)
        intents[row["conversation_hash"]] = intent
        clean_rows.append((turns, intent))
    # Exact duplicates: the same turns again (same conversation_hash), by another user.
    for turns, _ in rng.sample(clean_rows, 8):
        writer.add(turns)
    # Near-duplicates: one pasted template, different concepts.
    for concept in ["a cat in space", "a red car", "a forest at night", "an old castle", "a city in the rain",
                    "a bowl of fruit"]:
        turns = [("user", MIDJOURNEY.format(x=concept)), ("assistant", f"/imagine prompt: {concept}, detailed, 4k")]
        intents[writer.add(turns)["conversation_hash"]] = f"{INTENT_PREFIX} get image prompts written for Midjourney."
    for language, user_text, reply in NON_ENGLISH:
        for slot in rng.sample(PLACES, 6):
            writer.add([("user", user_text.format(x=slot)), ("assistant", reply.format(x=slot))], language=language)
    malformed = [
        [("user", ""), ("assistant", "It seems your message is empty. How can I help?")],           # empty user turn
        [("user", "hi"), ("assistant", "Hello!"), ("user", "   "), ("assistant", "Yes?")],            # blank user turn
        [("assistant", "Hello, how can I help you today?"), ("user", "write a poem")],               # starts with assistant
        [("user", "what is 2+2"), ("user", "hello?"), ("assistant", "4")],                           # two users in a row
        [("user", "say <|eot_id|> please"), ("assistant", "I cannot print control tokens.")],        # control token
    ]
    for turns in malformed:
        writer.add(turns)
    # Conversations ending on an unanswered user turn.
    for _ in range(3):
        task = rng.choice(sorted(TASKS))
        turns, intent = task_conversation(rng, task, rng.choice(TASKS[task]["slots"]))
        turns.append(("user", rng.choice(TASKS[task]["follow"])))
        intents[writer.add(turns)["conversation_hash"]] = intent
    # Flagged rows (the optional toxic and redacted filters).
    for flag in ["toxic", "redacted"]:
        for _ in range(3):
            turns, intent = task_conversation(rng, "story", rng.choice(STORY_TOPICS))
            intents[writer.add(turns, **{flag: True})["conversation_hash"]] = intent
    # A huge pasted turn: a long log the user wants explained.
    log = "\n".join(f"2023-06-01 12:{i // 60:02d}:{i % 60:02d} ERROR worker-{i % 7} connection reset by peer "
                    f"while reading response header from upstream (attempt {i})" for i in range(400))
    turns = [("user", "why does my server keep failing? here is the log:\n" + log),
             ("assistant", "The log shows repeated connection resets from the upstream server. Check its "
                           "timeouts and memory, then restart it."),
             ("user", "how do i check the memory?"), ("assistant", "Run free -h or top on the server.")]
    intents[writer.add(turns)["conversation_hash"]] = f"{INTENT_PREFIX} find out why their web server keeps failing."
    # A conversation with no hashed_ip (not seen in WildChat-1M, but a user's own logs may lack it).
    turns, intent = task_conversation(rng, "math", "fractions")
    intents[writer.add(turns, user=(None, None, None))["conversation_hash"]] = intent
    return writer.table(), intents


def make_prism(rng: random.Random, n: int) -> tuple[list[dict], dict[str, str]]:
    rows, intents = [], {}
    models = [("openai", "gpt-4"), ("anthropic", "claude-2"), ("meta", "llama-2-70b-chat"), ("google", "palm-2")]
    for c in range(n):
        task = rng.choice(sorted(TASKS))
        slot = rng.choice(TASKS[task]["slots"])
        turns, intent = task_conversation(rng, task, slot)
        turns = turns[: 2 * min(len(turns) // 2, 1 + rng.randint(0, 4))]
        history = []
        for t in range(len(turns) // 2):
            history.append({"turn": t, "role": "user", "content": turns[2 * t][1], "model_provider": None,
                            "model_name": None, "score": None, "if_chosen": None, "within_turn_id": None})
            n_responses = 4 if t == 0 else 2
            chosen = rng.randrange(n_responses)
            for r in range(n_responses):
                provider, name = models[r % len(models)]
                text = turns[2 * t + 1][1] if r == chosen else f"Response {r} from {name} about {slot}."
                history.append({"turn": t, "role": "model", "content": text, "model_provider": provider,
                                "model_name": name, "score": 80 if r == chosen else rng.randint(10, 70),
                                "if_chosen": r == chosen, "within_turn_id": r})
        if c % 10 == 3:  # a tie between two identical chosen replies: collapses to one
            dup = next(dict(e) for e in history if e["role"] == "model" and e["if_chosen"])
            dup["within_turn_id"] = 9
            history.append(dup)
        if c % 10 == 7:  # a tie between two different chosen replies: the higher score wins
            first = next(e for e in history if e["role"] == "model" and e["if_chosen"])
            history.append(dict(first, content="A different chosen reply.", score=first["score"] - 5,
                                within_turn_id=8))
        if c % 5 == 0:
            rng.shuffle(history)  # entries may come out of order
        conversation_id = f"c{c}"
        rows.append({
            "conversation_id": conversation_id, "user_id": f"user{c % 17}",
            "conversation_type": rng.choice(["unguided", "values guided", "controversy guided"]),
            "opening_prompt": history[0]["content"] if history[0]["role"] == "user" else turns[0][1],
            "conversation_turns": len(turns) // 2, "generated_datetime": "2023-11-22 10:00:00",
            "included_in_balanced_subset": c % 2 == 0, "conversation_history": history,
            "performance_attributes": {"values": 80}, "choice_attributes": {"values": 70},
            "open_feedback": "It was fine.", "timing_duration_s": 120.0 + c,
        })
        intents[conversation_id] = intent
    return rows, intents


def write_jsonl(path: Path, rows) -> None:
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=SAMPLE_DIR)
    parser.add_argument("--wildchat-rows", type=int, default=300, help="clean English conversations")
    parser.add_argument("--prism-rows", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    table, intents = make_wildchat(rng, args.wildchat_rows)
    pq.write_table(table, args.out / "wildchat.parquet", compression="zstd")
    prism, prism_intents = make_prism(rng, args.prism_rows)
    write_jsonl(args.out / "prism.jsonl", prism)
    write_jsonl(args.out / "intents.jsonl",
                ({"conversation_hash": k, "intent": v} for k, v in sorted({**intents, **prism_intents}.items())))
    print(f"wrote {table.num_rows} WildChat rows, {len(prism)} PRISM rows and "
          f"{len(intents) + len(prism_intents)} intents to {args.out}")


if __name__ == "__main__":
    main()
