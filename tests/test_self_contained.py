"""The repository stands alone: nothing it tracks points at documents outside it, its Markdown
links resolve, and the config keys docs/reproduction.md names exist.

What the code relies on from outside sources (the paper, the model card, dataset schemas, traps of
the software stack) is written down in the repository itself, in docs/ or in the docstring that
needs it; someone who clones the repository has nothing else. The patterns are assembled from
pieces so that this file does not match itself.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path, PurePosixPath


ROOT = Path(__file__).resolve().parents[1]

# Pointers at documents outside the repository: the notes folder beside the checkout, and the
# machine's absolute work path.
OUTSIDE = re.compile("|".join([
    re.escape("shared" + "/reference"),
    re.escape(".." + "/shared"),
    re.escape("/" + "work" + "/"),
    "reference" + r" sections? \d",          # a numbered section of such a note
]))
# File names of those outside notes: a mention is a pointer unless the repository has such a file.
OUTSIDE_NOTES = ("userlm" + "-paper.md", "cpu" + "-stack.md", "lost-in" + "-conversation.md",
                 "datasets" + ".md", "style" + ".md")

LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE_LINK = re.compile(r"^\s*\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+\"[^\"]*\")?\s*$", re.MULTILINE)
SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")
STAGES = ("data_prep", "train", "perplexity", "simulate", "intrinsic", "extrinsic", "table")
CONFIG_KEY = re.compile(r"`(" + "|".join(STAGES) + r"):([\w./=-]+)`")


def tracked_files() -> list[str]:
    # The suite runs in a git checkout (CI clones the repository): without one this check must fail, not pass.
    listing = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True, timeout=60).stdout
    return [name for name in listing.decode().split("\0") if name]


def text_of(name: str) -> str | None:
    """The file's text, or None for a binary file (a NUL byte, or not UTF-8)."""
    data = (ROOT / name).read_bytes()
    if b"\0" in data:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def pointers_outside(text: str, tracked_names: set[str]) -> list[tuple[int, str]]:
    """(line number, what) for each pointer in `text` at a document outside the repository."""
    found = []
    for number, line in enumerate(text.splitlines(), 1):
        found += [(number, m.group()) for m in OUTSIDE.finditer(line)]
        found += [(number, note) for note in OUTSIDE_NOTES if note in line and note not in tracked_names]
    return found


def link_targets(text: str) -> list[str]:
    """Targets of the Markdown links (inline and reference-style) in `text`."""
    return [m.group(1) for m in LINK.finditer(text)] + [m.group(1) for m in REFERENCE_LINK.finditer(text)]


def broken_links(document: str, text: str, tracked: set[str]) -> list[str]:
    """The links of `document` (a repository path) to repository paths that are no tracked file or
    folder of tracked files. Links with a scheme (https:, mailto:) and bare anchors are not checked."""
    folders = {str(parent) for name in tracked for parent in PurePosixPath(name).parents}
    broken = []
    for target in link_targets(text):
        if SCHEME.match(target) or target.startswith("#"):
            continue
        path = target.split("#", 1)[0]
        parts = []
        for part in (PurePosixPath(document).parent / path).parts:
            if part == "..":
                if not parts:
                    broken.append(f"{target} (outside the repository)")
                    break
                parts.pop()
            elif part != ".":
                parts.append(part)
        else:
            resolved = "/".join(parts)
            if resolved not in tracked and resolved not in folders:
                broken.append(target)
    return broken


def markdown_documents(tracked: list[str]) -> list[str]:
    return [name for name in tracked if name == "README.md" or re.fullmatch(r"docs/[^/]+\.md", name)]


# ---- the checks themselves, on texts whose answer is known ---------------------------------------
def test_pointers_outside_finds_each_kind():
    text = ("ok line\n"
            "# see " + "shared" + "/reference/x.md and " + ".." + "/shared" + "/y\n"
            "path /" + "work" + "/main/z, reference" + " section 8\n"
            "notes: " + OUTSIDE_NOTES[1] + ", docs/reproduction.md\n")
    assert pointers_outside(text, set()) == [
        (2, "shared" + "/reference"), (2, ".." + "/shared"),
        (3, "/" + "work" + "/"), (3, "reference" + " section 8"),
        (4, OUTSIDE_NOTES[1])]
    assert pointers_outside("notes: " + OUTSIDE_NOTES[3], {OUTSIDE_NOTES[3]}) == []   # a file of ours


def test_broken_links_resolves_relative_to_the_document():
    tracked = {"README.md", "docs/reproduction.md", "conf/train/config.yaml"}
    text = ("[a](reproduction.md) [b](../conf/train/config.yaml#L3) [c](../conf/train) [d](https://x.org/y) "
            "[e](#section) [f](missing.md) [g](../../outside.md) [h](intents.md)\n"
            "[ref]: ../README.md\n[bad]: ../nothing.txt\n")
    assert broken_links("docs/reproduction.md", text, tracked) == [
        "missing.md", "../../outside.md (outside the repository)", "intents.md", "../nothing.txt"]


# ---- the repository ------------------------------------------------------------------------------
def test_no_tracked_file_points_outside_the_repository():
    tracked = tracked_files()
    names = {PurePosixPath(n).name for n in tracked}
    found = []
    for name in tracked:
        text = text_of(name) if (ROOT / name).is_file() else None
        if text is not None:
            found += [f"{name}:{line}: {what}" for line, what in pointers_outside(text, names)]
    assert not found, ("these point at documents outside the repository; say what is needed in place, "
                       "or point into docs/:\n" + "\n".join(found))


def test_markdown_links_resolve_to_tracked_files():
    tracked = tracked_files()
    documents = markdown_documents(tracked)
    assert "README.md" in documents and "docs/reproduction.md" in documents
    broken = [f"{document}: {target}" for document in documents
              for target in broken_links(document, (ROOT / document).read_text(), set(tracked))]
    assert not broken, "links to no tracked file:\n" + "\n".join(broken)


def test_reproduction_config_keys_exist():
    """Every `stage:key` docs/reproduction.md names is a key of that stage's composed config, and
    every `stage:group=choice` composes."""
    import evaluate.config  # noqa: F401  (register the schemas of perplexity and table)
    import evaluate.simulate_config  # noqa: F401  (simulate, intrinsic)
    import evaluate.extrinsic.config  # noqa: F401  (extrinsic)
    import train.config  # noqa: F401
    from omegaconf import OmegaConf

    from scripts.hydra_compose import compose_config

    references = sorted(set(CONFIG_KEY.findall((ROOT / "docs" / "reproduction.md").read_text())))
    assert len(references) > 50 and {stage for stage, _ in references} == set(STAGES)
    composed, missing = {}, []
    for stage, key in references:
        if "=" in key:
            try:
                compose_config(stage, [key])
            except Exception as error:  # noqa: BLE001  (any composition error is the finding)
                missing.append(f"{stage}:{key} ({type(error).__name__})")
            continue
        if stage not in composed:
            composed[stage] = compose_config(stage, [])
        node = composed[stage]
        for part in key.split("."):
            if not OmegaConf.is_dict(node) or part not in node.keys():   # keys(): a ??? value is a key too
                missing.append(f"{stage}:{key}")
                break
            node = node._get_node(part)
    assert not missing, "docs/reproduction.md names config keys that do not exist:\n" + "\n".join(missing)
