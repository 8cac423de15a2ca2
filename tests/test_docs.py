"""The repository is self-contained: every document it points at is in it, and no file names a
location on a development machine.

(a) Every Markdown link target, and every path-like mention of a Markdown document in
    code, comments and docs, resolves to a file of the checkout: relative to the mentioning
    file's directory or to the repository root. A bare file name (no directory part) may
    also name a document elsewhere in the repository, since prose says "SERVER.md" for
    native/SERVER.md; it still has to exist somewhere in it.
(b) No text file holds an absolute path of a development machine: under /work, /root,
    /home/<user>, or /tmp used as a project location.

Pure Python, no network: the files come from `git ls-files` (tracked, plus new files that
git does not ignore), or from a walk of the tree where there is no git checkout (an sdist).
A citation of a section, `<doc>.md, "<heading>"`, must name a heading of that document. The
helpers are tested on sample strings, so that a checker which finds nothing cannot pass by
accident.
"""
from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# which files are checked: source, build and documentation text (patches/ holds upstream
# llama.cpp text and measurement JSONs are data, so neither is scanned)
SUFFIXES = {".py", ".md", ".h", ".cpp", ".toml", ".in", ".cfg"}
NAMES = {"Makefile"}
DIRS = {".ci"}

# [text](target) and [text](target "title"); images too
MD_LINK = re.compile(r"!?\[[^\]\n]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
# a path-like mention of a Markdown document: name chars, optional directories, ".md"
MD_MENTION = re.compile(r"(?<![\w./*~$-])(/?(?:\.{1,2}/)*(?:[\w-][\w.-]*/)*[\w-][\w.-]*\.md)(?![\w-])")
# a citation of a section: `<doc>.md, "<heading>"`
SECTION_CITE = re.compile(r"(?<![\w./-])((?:[\w-][\w.-]*/)*[\w-][\w.-]*\.md), \"([^\"\n]+)\"")
# absolute locations of a development machine (spelled apart, so that this file has none)
WORK, ROOT_HOME, HOME, TMP = "/wo" "rk/", "/ro" "ot/", "/ho" "me/", "/t" "mp/"
MACHINE_PATH = re.compile(rf"(?<![\w.~$}}/-])({WORK}|{ROOT_HOME}|{HOME}[\w.-]+|{TMP})")

# mentions of a Markdown file that are not references to a repository document,
# as (mentioning file, mention): why each one is fine
NOT_REFERENCES = {
    ("orthrus_gguf/train/card.py", "MODEL_CARD.md"): "the card this module writes for a trained model",
}
# machine paths that are deliberate, as (file, path prefix): why each one is fine
ALLOWED_MACHINE_PATHS: dict[tuple[str, str], str] = {}


# what the fallback walk of a tree without git (an unpacked sdist) leaves out
NOT_SOURCES = {".git", ".venv", "build", "dist", "__pycache__", ".pytest_cache", "out"}


def repo_files() -> list[str]:
    """Tracked files plus untracked ones git does not ignore, relative to ROOT; outside a git
    checkout, every file of the tree but build outputs and environments."""
    if (ROOT / ".git").exists():
        out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
                             cwd=ROOT, capture_output=True, check=True, timeout=60).stdout
        return sorted({f for f in out.decode().split("\0") if f and (ROOT / f).is_file()})
    found = []
    for d, dirs, names in os.walk(ROOT):
        dirs[:] = [x for x in dirs if x not in NOT_SOURCES and not x.endswith(".egg-info")]
        found += [Path(d, n).relative_to(ROOT).as_posix() for n in names]
    return sorted(found)


def is_checked(rel: str) -> bool:
    p = Path(rel)
    return p.suffix in SUFFIXES or p.name in NAMES or (p.parts[0] in DIRS and len(p.parts) > 1)


def text_files() -> dict[str, str]:
    out = {}
    for rel in repo_files():
        if is_checked(rel):
            out[rel] = (ROOT / rel).read_text(encoding="utf-8", errors="replace")
    return out


def doc_references(text: str, markdown: bool) -> list[str]:
    """The document references of a file's text: Markdown link targets (in Markdown files,
    external links and in-page anchors left out, #fragments dropped) and path-like mentions
    of *.md files."""
    refs = []
    if markdown:
        for m in MD_LINK.finditer(text):
            target = m.group(1)
            if re.match(r"^[a-zA-Z][\w+.-]*:", target) or target.startswith("#"):
                continue  # http:, https:, mailto:, ... and anchors in the same page
            refs.append(target.split("#", 1)[0])
    refs += [m.group(1) for m in MD_MENTION.finditer(text)]
    return list(dict.fromkeys(refs))  # a link target is also a mention: once each


def resolves(ref: str, mentioned_in: str, files: set[str], basenames: set[str]) -> bool:
    """Whether `ref`, mentioned in repository file `mentioned_in`, names a repository file
    (or, for a Markdown link, a directory): relative to that file's directory or to the root;
    a bare file name may also be any repository file of that name."""
    for base in ((ROOT / mentioned_in).parent, ROOT):
        target = Path(os.path.normpath(base / ref))  # lexically: no symlinks followed
        try:
            rel = target.relative_to(ROOT).as_posix()
        except ValueError:
            continue  # outside the repository
        if rel in files or any(f.startswith(rel + "/") for f in files):
            return True
    return "/" not in ref and ref in basenames


def broken_references(text: str, mentioned_in: str, files: set[str]) -> list[str]:
    basenames = {f.rsplit("/", 1)[-1] for f in files}
    out = []
    for ref in doc_references(text, mentioned_in.endswith(".md")):
        if (mentioned_in, ref) in NOT_REFERENCES:
            continue
        if not resolves(ref, mentioned_in, files, basenames):
            out.append(ref)
    return out


def missing_sections(text: str, mentioned_in: str, files: set[str]) -> list[str]:
    """Citations `<doc>.md, "<heading>"` in `text` whose document has no such heading."""
    out = []
    for m in SECTION_CITE.finditer(text):
        doc, section = m.group(1), m.group(2)
        for base in ((ROOT / mentioned_in).parent, ROOT):
            path = Path(os.path.normpath(base / doc))
            if path.is_file() and path.relative_to(ROOT).as_posix() in files:
                headings = re.findall(r"^#+\s+(.+?)\s*#*$", path.read_text(encoding="utf-8"), re.M)
                if section in headings:
                    break
        else:
            out.append(f"{doc}, {section!r}")
    return out


def machine_paths(text: str, in_file: str = "") -> list[str]:
    """Lines of `text` holding an absolute development-machine path, as 'LINE: text'."""
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        for m in MACHINE_PATH.finditer(line):
            if (in_file, m.group(1)) not in ALLOWED_MACHINE_PATHS:
                out.append(f"{n}: {line.strip()}")
                break
    return out


# ------------------------------------------------------------------ the helpers themselves

FILES = {"README.md", "docs/NUMERICS.md", "docs/ALGORITHM.md", "native/README.md", "native/SERVER.md",
         "orthrus_gguf/decode.py", "models/orthrus-tiny/MODEL_CARD.md"}
MD = ".md"  # spelled apart, so that the samples below are no references of this file


def test_helpers_flag_missing_documents():
    missing = "see ORTHRUS" + MD + " and docs/NO_SUCH" + MD + " for details"
    assert broken_references(missing, "orthrus_gguf/decode.py", FILES) == ["ORTHRUS" + MD, "docs/NO_SUCH" + MD]
    link = "the [spec](../docs/NO_SUCH" + MD + "#greedy) and [numerics](NUMERICS" + MD + ")"
    assert broken_references(link, "docs/ALGORITHM" + MD, FILES) == ["../docs/NO_SUCH" + MD]
    # resolved: relative to the file, to the root, a bare name elsewhere in the repository
    fine = ("(docs/ALGORITHM" + MD + ', "Greedy decoding") `native/SERVER' + MD + "` SERVER" + MD
            + " [up](../README" + MD + ") [web](https://example.org/x" + MD + ") [here](#greedy-decoding)")
    assert broken_references(fine, "docs/NUMERICS" + MD, FILES) == []
    assert broken_references("`README" + MD + "`", "native/SERVER" + MD, FILES) == []
    # a path out of the repository never resolves, relative or absolute
    out = ["../../shared/LLAMA_CPP" + MD, WORK + "shared/LLAMA_CPP" + MD]
    assert broken_references(" ".join(out), "docs/ALGORITHM" + MD, FILES) == out
    # not a document reference: a suffix test, a glob
    assert doc_references('f.suffix == "' + MD + '" or "*' + MD + '"', markdown=False) == []


def test_helpers_flag_missing_sections():
    files = set(repo_files())
    cite = 'as in (docs/ALGORITHM' + MD + ', "Greedy decoding") and (docs/ALGORITHM' + MD + ', "No such section")'
    assert missing_sections(cite, "orthrus_gguf/decode.py", files) == ["docs/ALGORITHM" + MD + ", 'No such section'"]
    assert missing_sections('(NUMERICS' + MD + ', "Cost")', "docs/LLAMA_CPP" + MD, files) == ["NUMERICS" + MD + ", 'Cost'"]


def test_helpers_flag_machine_paths():
    w, r, h, t = WORK, ROOT_HOME, HOME + "alice", TMP
    text = "\n".join([
        f"see {w}shared/LLAMA_CPP{MD}",
        f"  `*.py` under `{r}.pyenv/versions/3.11.7/lib/python3.11`",
        f"cd {h}/orthrus-gguf",
        f'"model": "{t}ocache/demo/tiny.gguf"',
        "relative: framework/work/x, ~/.cache/orthrus-gguf, $HOME/work/x, tmp_path / 'x'",
    ])
    assert machine_paths(text) == [f"{i}: {line.strip()}" for i, line in enumerate(text.splitlines()[:4], 1)]


# ------------------------------------------------------------------ the repository


def test_every_document_reference_resolves():
    texts = text_files()
    files = set(repo_files())
    assert "docs/ALGORITHM.md" in files and "docs/LLAMA_CPP.md" in files
    broken = {rel: refs for rel, text in texts.items() if (refs := broken_references(text, rel, files))}
    assert not broken, f"references to documents that are not in the repository: {broken}"


def test_no_development_machine_paths():
    texts = text_files()
    # the measurements' JSON too (reports name their model by file name only)
    texts |= {rel: (ROOT / rel).read_text(encoding="utf-8") for rel in repo_files()
              if rel.startswith("docs/measurements/") and rel.endswith(".json")}
    found = {rel: hits for rel, text in texts.items() if (hits := machine_paths(text, rel))}
    assert not found, f"absolute paths of a development machine: {found}"


def test_cited_sections_exist():
    # the decoding loop's docstring cites this one (orthrus_gguf/decode.py)
    assert "\n## Greedy decoding\n" in (ROOT / "docs" / "ALGORITHM.md").read_text(encoding="utf-8")
    files = set(repo_files())
    missing = {rel: m for rel, text in text_files().items() if (m := missing_sections(text, rel, files))}
    assert not missing, f"citations of sections that their document does not have: {missing}"
