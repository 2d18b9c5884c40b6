"""Check that exported checkpoints and tokenizers work alike under transformers 4.57.6 and 5.x.

    python scripts/checkpoint_compat.py outputs/tiny/train/model outputs/tiny/data/wildchat/tokenizer

Each directory is loaded with AutoTokenizer (and AutoModelForCausalLM when it holds a config.json)
and put through UserLM-8b's published snippet: the intent as the system message rendered by
apply_chat_template, then generate with the EOS (<|eot_id|>, or <|im_end|> for chatml) as the end token and <|endconversation|>
banned, as the model card shows, but greedy (do_sample=False) so that the two runs can be
compared. A conversation with turns is rendered too, and the text is encoded and decoded. This
runs twice, each in a subprocess of this interpreter: once with the project's transformers 5 and
once with 4.57.6 shadowing it (PYTHONPATH; installed by scripts/setup_transformers4.sh on first use,
about 20 s from PyPI). It prints what differs and exits 1 when anything does or a load fails (the
error from the failing version is shown), else 0. The subprocess side imports only transformers
and torch, as a user's script would.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
INTENT = ("You are a user chatting with an assistant language model to obtain some recommendations of places "
          "to see in Algeria.")
CONVERSATION = [{"role": "system", "content": INTENT},
                {"role": "user", "content": "what should i see in algeria?"},
                {"role": "assistant", "content": "The Casbah of Algiers, Timgad and the Tassili n'Ajjer."},
                {"role": "user", "content": "and in the south ?"},
                {"role": "assistant", "content": "Djanet, and the dunes of the Grand Erg Oriental."}]
TEXT = "Hello world , it 's me .\n<|endconversation|> caf\u00e9 \U0001f642"
MAX_NEW_TOKENS = 10
LOGITS_TOLERANCE = 1e-4  # fp32 on one machine; the rest must be equal exactly


def snippet(directory: Path) -> dict:
    """What one transformers version makes of `directory` (run in the subprocess)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(directory)
    inputs = tokenizer.apply_chat_template([{"role": "system", "content": INTENT}], return_tensors="pt",
                                           return_dict=False)
    end_token_id = tokenizer.encode(tokenizer.eos_token, add_special_tokens=False)   # the format's end of turn
    end_conv_token_id = tokenizer.encode("<|endconversation|>", add_special_tokens=False)
    conversation_ids = tokenizer.apply_chat_template(CONVERSATION, return_dict=False)
    text_ids = tokenizer.encode(TEXT)
    result = {
        "vocabulary": len(tokenizer),
        "special_tokens": {name: [token, tokenizer.convert_tokens_to_ids(token)]
                           for name, token in sorted(tokenizer.special_tokens_map.items()) if isinstance(token, str)},
        "added_tokens": {str(i): [t.content, t.special] for i, t in sorted(tokenizer.added_tokens_decoder.items())},
        "prompt_ids": inputs[0].tolist(), "end_token_id": end_token_id, "end_conv_token_id": end_conv_token_id,
        "conversation_ids": conversation_ids,
        "conversation_text": tokenizer.decode(conversation_ids),
        "text_ids": text_ids,
        "text_decoded": tokenizer.decode(text_ids, skip_special_tokens=True),
    }
    if not (directory / "config.json").exists():
        return result
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    for name, prompt in (("prompt", inputs), ("conversation", torch.tensor([conversation_ids]))):
        with torch.no_grad():
            result[f"{name}_logits"] = model(prompt).logits[0, -1, :16].tolist()
        outputs = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                                 max_new_tokens=MAX_NEW_TOKENS, eos_token_id=end_token_id,
                                 pad_token_id=tokenizer.eos_token_id,
                                 bad_words_ids=[[token_id] for token_id in end_conv_token_id])
        new_tokens = outputs[0][prompt.shape[1]:].tolist()
        result[f"{name}_generated_ids"] = new_tokens
        result[f"{name}_generated_text"] = tokenizer.decode(new_tokens, skip_special_tokens=True)
    return result


def transformers4_dir() -> Path:
    """scripts/setup_transformers4.sh's folder (installed now if it is not yet)."""
    done = subprocess.run(["bash", str(REPO / "scripts" / "setup_transformers4.sh")], capture_output=True,
                          text=True, env={**os.environ, "PYTHON": sys.executable}, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"scripts/setup_transformers4.sh failed (exit {done.returncode}): {done.stderr[-2000:]}")
    return Path(done.stdout.strip().splitlines()[-1])


def run_snippet(directories: list[Path], shadow: Path | None) -> dict:
    """{"transformers": version, directory: snippet(directory) or {"error": ...}} from a subprocess;
    `shadow`: a folder put first on PYTHONPATH (4.57.6's), or None for the interpreter's own."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    if shadow is not None:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(shadow), os.environ.get("PYTHONPATH")) if p)
    done = subprocess.run([sys.executable, __file__, "--snippet", *map(str, directories)], capture_output=True,
                          text=True, env=env, timeout=300)
    if done.returncode != 0:
        raise RuntimeError(f"the snippet subprocess failed (exit {done.returncode}): {done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def differences(first: dict, second: dict) -> list[str]:
    """What differs between two run_snippet results (their transformers versions aside)."""
    found = []
    for directory in sorted(set(first) - {"transformers"}):
        a, b = first[directory], second.get(directory, {"error": "missing"})
        if "error" in a or "error" in b:
            found += [f"{directory}: transformers {run['transformers']}: {run[directory]['error']}"
                      for run in (first, second) if "error" in run.get(directory, {})]
            continue
        for key in sorted(set(a) | set(b)):
            x, y = a.get(key), b.get(key)
            same = (x is not None and y is not None and len(x) == len(y)
                    and all(abs(u - v) <= LOGITS_TOLERANCE for u, v in zip(x, y))) if key.endswith("_logits") else x == y
            if not same:
                found.append(f"{directory}: {key}: {x!r} (transformers {first['transformers']}) != "
                             f"{y!r} (transformers {second['transformers']})")
    return found


def compare(directories: list[Path]) -> tuple[dict, dict, list[str]]:
    """(transformers 5's results, 4.57.6's, their differences) for `directories`."""
    current = run_snippet(directories, None)
    older = run_snippet(directories, transformers4_dir())
    if older["transformers"] != "4.57.6":
        raise RuntimeError(f"PYTHONPATH did not shadow transformers {current['transformers']}: got {older['transformers']}")
    return current, older, differences(current, older)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("directories", nargs="+", type=Path)
    parser.add_argument("--snippet", action="store_true", help="(internal) run under this interpreter and print JSON")
    args = parser.parse_args()
    if args.snippet:
        import transformers
        result = {"transformers": transformers.__version__}
        for directory in args.directories:
            try:
                result[str(directory)] = snippet(directory)
            except Exception as error:  # noqa: BLE001  (reported by the parent, naming the version)
                result[str(directory)] = {"error": f"{type(error).__name__}: {error}"}
        print(json.dumps(result))
        return
    current, older, found = compare([d.resolve() for d in args.directories])
    for line in found:
        print(line)
    verdict = "differ" if found else "agree"
    print(f"transformers {current['transformers']} and {older['transformers']} {verdict} on "
          f"{', '.join(map(str, args.directories))}")
    sys.exit(1 if found else 0)


if __name__ == "__main__":
    main()
