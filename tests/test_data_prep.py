"""python -m data_prep on the embedded sample: schema checks, funnel, splits, examples, determinism."""

import hashlib
import json
from collections import defaultdict
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import SAMPLE, run_data_prep
from data_prep.chat_format import END_CONVERSATION, EOT, IGNORE_INDEX
from data_prep.schemas import WILDCHAT_SCHEMA


def _funnel(data_dir: Path) -> dict:
    return json.loads((data_dir / "funnel.json").read_text())


def _removed(funnel: dict) -> dict:
    return {s["step"]: s for s in funnel["steps"]}


def test_funnel_accounts_for_every_conversation(tiny_data):
    funnel = _funnel(tiny_data)
    assert funnel["input"] == pq.read_metadata(SAMPLE / "wildchat.parquet").num_rows
    assert sum(s["removed"] for s in funnel["steps"]) + funnel["kept_total"] == funnel["input"]
    steps = _removed(funnel)
    assert [s["step"] for s in funnel["steps"]] == ["malformed", "language", "exact_duplicate", "near_duplicate",
                                                    "missing_intent", "bad_intent", "intent_too_long"]
    assert steps["malformed"]["reasons"] == {"malformed:control_token_in_text": 1, "malformed:empty_user_turn": 2,
                                             "malformed:roles_out_of_order": 2}
    assert steps["language"]["removed"] == 18            # the sample's Chinese, Russian, Spanish rows
    assert steps["exact_duplicate"]["removed"] == 8      # the sample's repeated conversations
    assert steps["near_duplicate"]["removed"] >= 5       # at least the pasted Midjourney template's copies
    dropped = [json.loads(line) for line in (tiny_data / "dropped.jsonl").read_text().splitlines()]
    assert len(dropped) == sum(s["removed"] for s in funnel["steps"])
    conversations = datasets.load_from_disk(str(tiny_data / "conversations"))
    unanswered = sum(not ended for split in conversations for ended in conversations[split]["ended"])
    assert funnel["events"]["unanswered_last_turn_no_end"] == unanswered > 0


def test_examples_are_the_flipped_user_turns(tiny_data):
    """K+1 samples per conversation, each labelled with exactly one user turn or the end token."""
    examples = datasets.load_from_disk(str(tiny_data))
    conversations = datasets.load_from_disk(str(tiny_data / "conversations"))
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(tiny_data / "tokenizer")
    for split in ("train", "test"):
        by_hash = defaultdict(list)
        for example in examples[split]:
            by_hash[example["conversation_hash"]].append(example)
        assert len(by_hash) == len(conversations[split])
        for conversation in conversations[split]:
            own = by_hash[conversation["conversation_hash"]]
            user_turns = [t["content"] for t in conversation["turns"] if t["role"] == "user"]
            expected = user_turns + ([END_CONVERSATION] if conversation["ended"] else [])
            assert len(own) == len(expected) == conversation["num_user_turns"] + conversation["ended"]
            for example, content in zip(own, expected):
                target = [t for t in example["labels"] if t != IGNORE_INDEX]
                decoded = tokenizer.decode(target)
                if example["truncated"] and not decoded.endswith(EOT):
                    assert ("\n" + content).startswith(decoded)
                else:
                    assert decoded == "\n" + content + EOT
                assert conversation["intent"] in tokenizer.decode(example["input_ids"])


def test_split_is_user_disjoint_and_holds_no_user_identifiers(tiny_data):
    raw = pq.read_table(SAMPLE / "wildchat.parquet", columns=["conversation_hash", "hashed_ip", "country"]).to_pylist()
    user_of = {}
    for r in raw:  # the first of exact duplicates is the one kept
        user_of.setdefault(r["conversation_hash"], (r["hashed_ip"], r["country"]))
    conversations = datasets.load_from_disk(str(tiny_data / "conversations"))
    split_of_user = defaultdict(set)
    for split in conversations:
        for h in conversations[split]["conversation_hash"]:
            split_of_user[user_of[h]].add(split)
    assert all(len(s) == 1 for s in split_of_user.values())
    assert {s for splits in split_of_user.values() for s in splits} == {"train", "validation", "test"}
    ips = {r["hashed_ip"] for r in raw if r["hashed_ip"]}
    for path in tiny_data.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert not any(ip.encode() in data for ip in ips), path


def test_same_config_gives_the_same_bytes(tiny_assets, tmp_path, monkeypatch):
    """Two runs from empty caches, in 2 processes, write identical bytes."""
    def digest(directory: Path) -> dict:
        return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(directory.rglob("*")) if p.is_file()}
    out = tmp_path / "run"
    digests = []
    for attempt in ("first", "second"):
        monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / f"cache-{attempt}"))
        digests.append(digest(run_data_prep(tiny_assets, out, "num_proc=2")))
    assert digests[0] == digests[1] and len(digests[0]) > 20


def test_changing_the_split_never_reuses_cached_examples(tiny_assets, tmp_path):
    """Each split's examples are exactly its conversations, whatever the cache holds."""
    for seed in (0, 1):
        out = run_data_prep(tiny_assets, tmp_path / "out", f"split.seed={seed}")
        examples = datasets.load_from_disk(str(out))
        conversations = datasets.load_from_disk(str(out / "conversations"))
        for split in conversations:
            assert set(examples[split]["conversation_hash"]) == set(conversations[split]["conversation_hash"])


@pytest.mark.parametrize("overrides, step, removed", [
    (["filters.toxic=true", "filters.near_duplicates.enabled=false"], "toxic", 3),
    (["filters.redacted=true", "filters.near_duplicates.enabled=false"], "redacted", 3),
    (["filters.max_user_turns=2"], "max_user_turns", None),
    (["filters.unanswered_last_turn=drop"], "malformed", 8),
    (["split.missing_user=drop"], "no_user_id", 1),
])
def test_optional_filters(tiny_assets, tmp_path, overrides, step, removed):
    funnel = _funnel(run_data_prep(tiny_assets, tmp_path / "out", *overrides))
    assert sum(s["removed"] for s in funnel["steps"]) + funnel["kept_total"] == funnel["input"]
    count = _removed(funnel)[step]["removed"]
    assert count == removed if removed is not None else count > 0


def test_trim_unanswered_last_turn_ends_the_conversation(tiny_assets, tmp_path):
    out = run_data_prep(tiny_assets, tmp_path / "out", "filters.unanswered_last_turn=trim",
                        "filters.near_duplicates.enabled=false")
    assert _funnel(out)["events"]["trimmed_unanswered_last_turn"] == 3
    conversations = datasets.load_from_disk(str(out / "conversations"))
    assert all(all(conversations[s]["ended"]) for s in conversations)


def test_per_conversation_has_the_per_turn_target_tokens(tiny_data, tiny_assets, tmp_path):
    whole = datasets.load_from_disk(str(run_data_prep(tiny_assets, tmp_path / "pc", "flip.mode=per_conversation",
                                                      "max_seq_len=16384")))
    per_turn = datasets.load_from_disk(str(tiny_data))
    for split in per_turn:
        if any(per_turn[split]["truncated"]):
            continue  # the 512-token per_turn set cut the huge pasted turn
        targets = defaultdict(list)
        for example in per_turn[split]:
            targets[example["conversation_hash"]] += [t for t in example["labels"] if t != IGNORE_INDEX]
        assert len(whole[split]) == len(targets)
        for example in whole[split]:
            assert [t for t in example["labels"] if t != IGNORE_INDEX] == targets[example["conversation_hash"]]


def test_prism_linearises_ties_and_keeps_every_conversation(tiny_prism):
    funnel = _funnel(tiny_prism)
    assert funnel["kept"] == {"test": 40} and funnel["input"] == 40
    assert funnel["events"]["prism_tie_identical"] == 4
    assert funnel["events"]["prism_tie_resolved_by_score"] == 4
    conversations = datasets.load_from_disk(str(tiny_prism / "conversations"))["test"]
    raw = {json.loads(line)["conversation_id"]: json.loads(line) for line in (SAMPLE / "prism.jsonl").open()}
    for conversation in conversations:
        history = raw[conversation["conversation_hash"]]["conversation_history"]
        assert conversation["num_user_turns"] == len({e["turn"] for e in history})
        assert all(t["content"] != "A different chosen reply." for t in conversation["turns"])  # lower score lost
        assert conversation["turns"][0]["role"] == "user" and conversation["ended"]


def _write_wildchat(path: Path, mutate) -> Path:
    rows = pq.read_table(SAMPLE / "wildchat.parquet").slice(0, 5).to_pylist()
    table = mutate(rows)
    pq.write_table(table, path)
    return path


def test_missing_column_is_an_error_naming_file_and_column(tiny_assets, tmp_path):
    bad = _write_wildchat(tmp_path / "bad.parquet",
                          lambda rows: pa.Table.from_pylist(rows, schema=WILDCHAT_SCHEMA).drop_columns(["conversation"]))
    with pytest.raises(ValueError, match=r"bad\.parquet: missing column 'conversation'"):
        run_data_prep(tiny_assets, tmp_path / "out", f"data.source={bad}")


def test_wrong_nested_type_is_an_error_naming_the_field(tiny_assets, tmp_path):
    def mutate(rows):
        for row in rows:
            for turn in row["conversation"]:
                turn["turn_identifier"] = str(turn["turn_identifier"])
                turn["toxic"] = "no"
        schema = pa.schema([f if f.name != "conversation" else pa.field("conversation", pa.list_(pa.struct(
            [(n, pa.string()) if n == "toxic" else (n, WILDCHAT_SCHEMA.field("conversation").type.value_type.field(n).type)
             for n in WILDCHAT_SCHEMA.field("conversation").type.value_type.names if n != "turn_identifier"])))
            for f in WILDCHAT_SCHEMA])
        for row in rows:
            for turn in row["conversation"]:
                del turn["turn_identifier"]
        return pa.Table.from_pylist(rows, schema=schema)
    bad = _write_wildchat(tmp_path / "nested.parquet", mutate)
    with pytest.raises(ValueError, match=r"nested\.parquet: field conversation\.toxic has type string"):
        run_data_prep(tiny_assets, tmp_path / "out", f"data.source={bad}")


def test_null_content_is_a_counted_drop(tiny_assets, tmp_path):
    def mutate(rows):
        rows[1]["conversation"][0]["content"] = None
        return pa.Table.from_pylist(rows, schema=WILDCHAT_SCHEMA)
    source = _write_wildchat(tmp_path / "nulls.parquet", mutate)
    out = run_data_prep(tiny_assets, tmp_path / "out", f"data.source={source}", "split.fractions.train=1.0",
                        "split.fractions.validation=0.0", "split.fractions.test=0.0")
    funnel = _funnel(out)
    assert _removed(funnel)["malformed"]["reasons"] == {"malformed:null_content": 1}
    dropped = [json.loads(line) for line in (out / "dropped.jsonl").read_text().splitlines()]
    assert {"row": 1, "step": "malformed", "reason": "malformed:null_content"}.items() <= dropped[0].items()


def test_bad_intents_line_names_file_and_line(tiny_assets, tmp_path):
    intents = tmp_path / "intents.jsonl"
    intents.write_text('{"conversation_hash": "a", "intent": "x"}\n{"conversation_hash": "b"}\n')
    with pytest.raises(ValueError, match=r"intents\.jsonl:2: field 'intent'"):
        run_data_prep(tiny_assets, tmp_path / "out", f"intents.path={intents}")


def test_unknown_config_key_is_an_error():
    from hydra.errors import ConfigCompositionException
    from conftest import compose_config
    with pytest.raises(ConfigCompositionException):
        compose_config("data_prep", ["experiment=tiny", "filters.toxicity=true"])


def test_own_chat_logs_need_only_hash_and_turns(tiny_assets, tmp_path):
    """A JSON Lines file of {conversation_hash, conversation: [{role, content}]} is enough."""
    logs = tmp_path / "logs.jsonl"
    rows = [{"conversation_hash": f"log{i}", "conversation": [{"role": "user", "content": f"question {i} about tea"},
                                                             {"role": "assistant", "content": "an answer"}]}
            for i in range(20)]
    logs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    intents = tmp_path / "intents.jsonl"
    intents.write_text("".join(json.dumps({"conversation_hash": r["conversation_hash"], "intent": "to ask"}) + "\n"
                               for r in rows))
    with pytest.raises(ValueError, match="no 'language' column"):
        run_data_prep(tiny_assets, tmp_path / "out", f"data.source={logs}", f"intents.path={intents}")
    out = run_data_prep(tiny_assets, tmp_path / "out", f"data.source={logs}", f"intents.path={intents}",
                        "filters.languages=null", "filters.near_duplicates.enabled=false")
    funnel = _funnel(out)
    assert funnel["kept_total"] == 20 and funnel["events"]["no_user_id_own_user"] == 20
    assert len(datasets.load_from_disk(str(out))["train"]) > 0


def test_an_empty_split_is_counted_but_not_written(tiny_assets, tmp_path):
    out = run_data_prep(tiny_assets, tmp_path / "out", "data.limit=20")
    funnel = _funnel(out)
    empty = {s for s, n in funnel["kept"].items() if n == 0}
    assert empty, "20 rows should leave a split empty"
    assert set(datasets.load_from_disk(str(out))) == set(funnel["kept"]) - empty


TEMPLATE = "As a prompt generator for a generative AI called Midjourney, you will create image prompts"


@pytest.mark.parametrize("overrides, removed, reasons", [
    # the first 7 normalised words are a key, one conversation kept per key: 3 of the 4 opening with it
    (["filters.near_duplicates.method=prefix_key"], 3, {"prefix_key": 3}),
    # every holder of a 7-gram seen more than 4 times: the 4 openings and the one quoting it mid-turn
    (["filters.near_duplicates.method=ngram_count", "filters.near_duplicates.threshold=4"], 5, {"ngram_count": 5}),
    (["filters.near_duplicates.method=ngram_count", "filters.near_duplicates.threshold=5"], 0, {}),
])
def test_both_near_duplicate_methods_count_what_they_remove(overrides, removed, reasons, tiny_assets, tmp_path):
    firsts = [f"{TEMPLATE} about {topic}." for topic in ("a cat", "the sea", "a city at night", "autumn")]
    firsts += [f"please help, my friend wrote: {TEMPLATE} and I do not get it",    # the template, quoted
               "As a prompt generator you will write haikus",                     # 4 words shared: no 7-gram
               "what is the tallest mountain in europe", "how do I boil an egg"]
    rows = [{"conversation_hash": f"c{i}", "language": "English",
             "conversation": [{"role": "user", "content": text}, {"role": "assistant", "content": "ok"}]}
            for i, text in enumerate(firsts)]
    logs = tmp_path / "logs.jsonl"
    logs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    intents = tmp_path / "intents.jsonl"
    intents.write_text("".join(json.dumps({"conversation_hash": r["conversation_hash"], "intent": "to ask"}) + "\n"
                               for r in rows))
    out = run_data_prep(tiny_assets, tmp_path / "out", f"data.source={logs}", f"intents.path={intents}", *overrides)
    step = _removed(_funnel(out))["near_duplicate"]
    assert (step["removed"], step["reasons"]) == (removed, reasons)


def test_intents_join_gathers_the_rows_by_arrow_and_reuses_its_file(tmp_path, monkeypatch):
    """conversations_with_intents: exactly the given rows, in order, with their intents last, across
    write chunks; the same fingerprint reuses the file written (a warm rerun); no rows is a valid split."""
    import data_prep.examples as examples
    monkeypatch.setattr(examples, "JOIN_ROWS", 2)  # 3 rows: two chunks
    rows = range(5)
    datasets.Dataset.from_dict({
        "conversation_hash": [f"h{i}" for i in rows], "malformed": [""] * 5,
        "turns": [[{"role": "user", "content": f"u{i}"}, {"role": "assistant", "content": f"a{i}"}] for i in rows],
        "ended": [i % 2 == 0 for i in rows], "language": ["English"] * 5, "num_user_turns": [1] * 5,
    }, features=datasets.Features({"conversation_hash": datasets.Value("string"), "malformed": datasets.Value("string"),
                                   "turns": examples.CONVERSATION_FEATURES["turns"], "ended": datasets.Value("bool"),
                                   "language": datasets.Value("string"), "num_user_turns": datasets.Value("int32")})
    ).save_to_disk(str(tmp_path / "records"))
    records = datasets.load_from_disk(str(tmp_path / "records"))
    joined = examples.conversations_with_intents(records, [4, 1, 3], ["i4", "i1", "i3"], "fp1")
    assert joined.column_names == ["conversation_hash", "turns", "ended", "language", "num_user_turns", "intent"]
    assert joined.to_dict() == {
        "conversation_hash": ["h4", "h1", "h3"], "ended": [True, False, False], "language": ["English"] * 3,
        "num_user_turns": [1, 1, 1], "intent": ["i4", "i1", "i3"],
        "turns": [[{"role": "user", "content": f"u{i}"}, {"role": "assistant", "content": f"a{i}"}] for i in (4, 1, 3)]}
    assert joined._fingerprint == "fp1"
    written = tmp_path / "records" / "conversations-fp1.arrow"
    stamp = written.stat().st_mtime_ns
    again = examples.conversations_with_intents(records, [4, 1, 3], ["i4", "i1", "i3"], "fp1")
    assert again["intent"] == ["i4", "i1", "i3"] and written.stat().st_mtime_ns == stamp
    assert sorted(p.name for p in (tmp_path / "records").iterdir() if "conversations" in p.name) == [written.name]
    empty = examples.conversations_with_intents(records, [], [], "fp-empty")
    assert len(empty) == 0 and empty.column_names == joined.column_names


def test_rows_are_gathered_in_any_order_across_record_batches_and_selections(tmp_path):
    """conversations.rows_of / column_of: the rows asked for, in the order asked, from a table of
    several record batches, and from a selection of it (its indices mapping)."""
    from data_prep.conversations import column_of, rows_of
    parts = [datasets.Dataset.from_dict({"s": [f"s{i}" for i in range(k, k + 7)], "n": list(range(k, k + 7))})
             for k in range(0, 70, 7)]
    datasets.concatenate_datasets(parts).save_to_disk(str(tmp_path / "t"), max_shard_size="1KB")
    table = datasets.load_from_disk(str(tmp_path / "t"))
    assert len(table.data.table.to_batches()) > 1
    for rows in ([], [3], list(range(70)), [69, 0, 5, 5, 33], [12, 11, 10, 50, 1]):
        assert column_of(table, rows, "s").to_pylist() == [f"s{i}" for i in rows]
    assert rows_of(table, [9, 2], ["n", "s"]).to_pylist() == [{"n": 9, "s": "s9"}, {"n": 2, "s": "s2"}]
    assert column_of(table.select([60, 2, 9, 40]), [3, 0, 2], "n").to_pylist() == [40, 60, 9]


def test_an_exact_duplicate_is_a_repeat_of_a_kept_conversation():
    """A conversation is dropped when its hash or its content repeats one kept before it; a dropped
    one adds nothing to what later rows are compared with (so c, whose hash repeats only the
    dropped b's, is kept)."""
    from omegaconf import OmegaConf
    from data_prep.funnel import filter_steps
    records = datasets.Dataset.from_dict({"conversation_hash": ["a", "b", "b", "d", None, None],
                                          "exact_key": ["x", "x", "y", "x", "z", "w"]})
    cfg = OmegaConf.create({"languages": None, "exact_duplicates": True, "near_duplicates": {"enabled": False},
                            "toxic": False, "redacted": False, "max_user_turns": None, "max_chars": None})
    exact = dict(filter_steps(cfg))["exact_duplicate"]
    assert exact(records, list(range(6))) == ["", "exact_duplicate", "", "exact_duplicate", "", "exact_duplicate"]
