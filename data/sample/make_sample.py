"""Regenerate the embedded sample corpus (data/sample/sample_{train,val}.jsonl.zst).

The committed sample is built from two Debian packages (see SOURCE.md):
  * bible-kjv / bible-kjv-text: the King James Bible (public domain), one
    document per chapter (1189 docs);
  * python3.11-doc: the reStructuredText sources of the Python 3.11
    documentation (PSF License); the prose-heavy parts (tutorial, HOWTOs, FAQ,
    language reference, ...) are lightly de-marked-up and split into
    section-sized documents.

Steps (Debian/Ubuntu, needs apt; takes a few seconds after the download):
    apt-get update && apt-get install -y bible-kjv
    apt-get download python3.11-doc && dpkg-deb -x python3.11-doc_*.deb /tmp/pydoc
    python data/sample/make_sample.py \
        --python-doc /tmp/pydoc/usr/share/doc/python3.11/html/_sources

Documents are shuffled with a fixed seed; every 10th one (by shuffled position)
goes to the validation file. Output is deterministic for given package versions.
"""
from __future__ import annotations

import argparse
import json
import random
import re
import subprocess
from pathlib import Path

import zstandard

HERE = Path(__file__).resolve().parent
PYDOC_DIRS = ["tutorial", "howto", "faq", "reference", "using", "extending",
              "installing", "distributing", "whatsnew"]
MIN_DOC_CHARS = 1500  # merge consecutive Python-doc sections until this long


# ---------------------------------------------------------------- KJV Bible
def kjv_documents() -> list[str]:
    """One document per chapter: 'Book N' title line, blank line, one verse per line."""
    out = subprocess.run(["bible", "gen1:1-rev22:21"], stdin=subprocess.DEVNULL,
                         capture_output=True, text=True, check=True).stdout
    docs, title, verses = [], None, []
    for line in out.splitlines():
        if not line.strip():
            continue
        m = re.match(r"^\s+\d+ (.*)$", line)
        if m:
            verses.append(m.group(1).strip())
        elif re.match(r"^[1-3]?\s?[A-Z][A-Za-z ]* \d+$", line):
            if title:
                docs.append(title + "\n\n" + "\n".join(verses))
            title, verses = line.strip(), []
        else:  # wrapped continuation of the previous verse
            verses[-1] += " " + line.strip()
    docs.append(title + "\n\n" + "\n".join(verses))
    if len(docs) != 1189:
        raise SystemExit(f"expected 1189 KJV chapters, parsed {len(docs)}")
    return docs


# ---------------------------------------------------------- Python docs (rst)
UNDERLINE = re.compile(r"^([=\-~^\"'`#*+.:_])\1{2,}\s*$")
DIRECTIVE = re.compile(r"^(\s*)\.\.\s+([\w:-]+)::\s*(.*)$")
DROP_BODY = {"index", "toctree", "literalinclude", "productionlist", "raw", "only",
             "testsetup", "testcleanup", "csv-table", "list-table", "table", "image",
             "figure", "tabularcolumns", "impl-detail", "audit-event", "availability"}
KEEP_ARGS = {"function", "class", "method", "attribute", "data", "exception", "decorator",
             "classmethod", "staticmethod", "module", "opcode", "cmdoption", "option",
             "describe", "envvar", "c:function", "c:type", "c:macro", "c:member", "c:var"}
ROLE = re.compile(r":[\w:+-]+:`([^`]*)`")


def _role_text(m: re.Match) -> str:
    raw = m.group(1)
    titled = re.match(r"^(.+?)\s*<[^>]*>$", raw, re.S)
    if titled:
        return titled.group(1)
    text = raw.lstrip("!")
    return text[1:].split(".")[-1] if text.startswith("~") else text


def clean_inline(text: str, prose: bool = True) -> str:
    """Replace inline rst markup in `text` (a whole paragraph) by its plain text."""
    text = ROLE.sub(_role_text, text)
    text = re.sub(r"``(.+?)``", r"\1", text, flags=re.S)
    text = re.sub(r"`([^`<]+?)\s*<[^>]+>`__?", r"\1", text)   # `text <url>`_
    text = re.sub(r"`([^`]+)`_{0,2}", r"\1", text)
    text = re.sub(r"\*\*([^*]+)\*\*", r"\1", text)
    text = re.sub(r"(?<![\w*])\*([^*\s][^*]*)\*(?![\w*])", r"\1", text)
    text = re.sub(r"\|(\w+)\|", r"\1", text)                   # substitutions
    text = re.sub(r" ?\[#\w*\]_", "", text)                      # footnote refs
    if prose:
        text = re.sub(r"\\(.)", r"\1", text)
    return text


CODE_DIRECTIVES = {"code-block", "code", "sourcecode", "doctest", "testcode", "testoutput",
                   "parsed-literal"}


def rst_to_sections(text: str) -> list[str]:
    """Strip block-level rst markup; return the text split at section headings.

    Directive bodies are de-indented (except code), dropped directives
    (index, toctree, ...) and comments vanish with their bodies, heading
    underlines start a new section. Inline markup is removed later, per paragraph.
    """
    out: list[str] = []
    stack: list[list] = []  # open directives: [indent, body indent or None, dedent body?]
    skip_indent = None      # inside the body of a dropped directive / comment
    for raw in text.splitlines():
        line = raw.rstrip()
        indent = len(line) - len(line.lstrip())
        if not line:
            out.append("")
            continue
        if skip_indent is not None:
            if indent > skip_indent:
                continue
            skip_indent = None
        while stack and indent <= stack[-1][0]:
            stack.pop()
        if stack and stack[-1][1] is None:
            stack[-1][1] = indent
        cut = next((st[1] for st in reversed(stack) if st[2]), 0)
        body = line[min(cut, indent):]
        if stack and re.match(r"^\s*:[\w -]+:", line) and indent == stack[-1][1] and out[-1] == "\x01":
            continue  # directive option line (":linenos:" etc.)
        m = DIRECTIVE.match(line)
        if m:
            name, args = m.group(2), m.group(3)
            pad = " " * (len(body) - len(body.lstrip()))
            if name in DROP_BODY:
                skip_indent = indent
                continue
            stack.append([indent, None, name not in CODE_DIRECTIVES])
            if name in KEEP_ARGS and args:
                out.append(pad + args)
            elif name in {"versionadded", "versionchanged", "deprecated"} and args:
                words = {"versionadded": "New in version", "versionchanged": "Changed in version",
                         "deprecated": "Deprecated since version"}[name]
                out.append(f"{pad}{words} {args.split()[0]}.")
            out.append("\x01")  # marks "directive start" for option-line skipping
            continue
        if re.match(r"^\s*\.\.(\s|$)", line):  # comment, label target, footnote
            skip_indent = indent
            continue
        if UNDERLINE.match(line):
            out.append("\x00" if out and out[-1].strip() and out[-1] != "\x01" else "")
            continue
        if re.match(r"^\s*[+=][-=+ ]+[+=]?\s*$", line):  # table border
            continue
        if re.match(r"^\s*\|.*\|\s*$", line):  # grid table row
            body = re.sub(r"\s*\|\s*", "  ", body).strip()
        if body.endswith("::"):
            body = body[:-1] if body.strip() != "::" else ""
        out.append(body)
    out = [x for x in out if x != "\x01"]
    # \x00 marks "the previous line is a heading": cut sections there
    sections, cur = [], []
    for line in out:
        if line == "\x00":
            heading = cur.pop() if cur else ""
            sections.append(cur)
            cur = [heading.strip(), ""]
        else:
            cur.append(line)
    sections.append(cur)
    return [reflow(s) for s in sections if any(x.strip() for x in s)]


def reflow(lines: list[str]) -> str:
    """Join wrapped lines of prose paragraphs and list items; keep code blocks as-is."""
    bullet = re.compile(r"^\s*([-*+]|\d+\.|#\.) ")
    paras, cur = [], []
    for line in lines + [""]:
        if line.strip():
            cur.append(line)
            continue
        if cur:
            if bullet.match(cur[0]):  # list: one line per item
                items = []
                for x in cur:
                    if bullet.match(x) or not items:
                        items.append(x.strip())
                    else:
                        items[-1] += " " + x.strip()
                paras.append(clean_inline("\n".join(items)))
            elif all(not x.startswith(" ") for x in cur) and not cur[0].startswith(">>>"):
                paras.append(clean_inline(" ".join(x.strip() for x in cur)))
            else:
                paras.append(clean_inline("\n".join(cur), prose=False))
            cur = []
    return "\n\n".join(paras).strip()


def pydoc_documents(src: Path) -> list[str]:
    docs = []
    for sub in PYDOC_DIRS:
        files = sorted((src / sub).rglob("*.rst.txt"))
        if not files:
            raise SystemExit(f"no .rst.txt files under {src / sub}")
        for path in files:
            pending = ""
            for sec in rst_to_sections(path.read_text(encoding="utf-8")):
                pending = f"{pending}\n\n{sec}".strip()
                if len(pending) >= MIN_DOC_CHARS:
                    docs.append(pending)
                    pending = ""
            if len(pending) >= 200:
                docs.append(pending)
    return docs


def write_jsonl_zst(path: Path, docs: list[str]) -> None:
    data = "".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs).encode()
    path.write_bytes(zstandard.ZstdCompressor(level=19).compress(data))
    print(f"{path}: {len(docs)} docs, {len(data)/1e6:.2f} MB raw, {path.stat().st_size/1e6:.2f} MB zst")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--python-doc", type=Path, required=True,
                    help="the html/_sources dir of an extracted python3.11-doc package")
    ap.add_argument("--out", type=Path, default=HERE)
    ap.add_argument("--seed", type=int, default=1234)
    args = ap.parse_args()
    docs = kjv_documents() + pydoc_documents(args.python_doc)
    random.Random(args.seed).shuffle(docs)
    write_jsonl_zst(args.out / "sample_train.jsonl.zst", [d for i, d in enumerate(docs) if i % 10 != 0])
    write_jsonl_zst(args.out / "sample_val.jsonl.zst", [d for i, d in enumerate(docs) if i % 10 == 0])


if __name__ == "__main__":
    main()
