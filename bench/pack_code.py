#!/usr/bin/env python3
"""Pack train_gpt.py into a small self-extracting file: the code bytes a record counts.

The challenge counts the UTF-8 bytes of the submitted train_gpt.py. The readable file stays at the top of the
repository; the record folder gets a packed copy: a few lines of plain Python holding the readable source,
compressed (lzma, bz2 or zlib from the standard library) and base85-encoded. Run as a script (`python`,
`torchrun`), the packed file decompresses the source and runs it in its own module namespace, so:

  * `__name__` is the packed module's (`"__main__"` under python / torchrun, a module name when imported),
    classes pickle and dataclasses resolve their annotations as they do from the readable file;
  * `__file__` is the packed file, so train_gpt.py's code_bytes() counts the packed file's bytes (what is counted);
  * `_PACKED_SOURCE` holds the inner source's bytes: train_gpt.py hashes it for the provenance line
    (`code_sha256:` = sha256 of the source that ran, equal to sha256 of the readable file) and logs
    `packed_bytes:` / `source_bytes:` next to it;
  * the source is registered in `linecache` under the packed file's name, so tracebacks and `inspect` show the
    readable lines instead of the base85 line.

The inner source is the readable file byte for byte unless --minify is given: that strips docstrings and comments
by re-printing the syntax tree (`ast.unparse`) and refuses the result unless it parses to the same tree as the
docstring-stripped original. A minified run's code_sha256 is then the minified source's hash, not the readable
file's.

Usage:
    python bench/pack_code.py [SRC] --out PATH [--codec auto|lzma|bz2|zlib] [--minify]   # write a packed file
    python bench/pack_code.py [SRC] --table                                            # raw vs packed sizes
    python bench/pack_code.py --unpack PACKED [--out PATH]                             # the inner source

`unpack` (and bench/check_record.py) reads a packed file without running it.
"""
from __future__ import annotations

import argparse
import ast
import base64
import bz2
import hashlib
import lzma
import os
import re
import sys
import zlib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_SOURCE = os.path.join(ROOT, "train_gpt.py")
CODECS = ("lzma", "bz2", "zlib")
MARKER = b"#packed train_gpt.py"

_LZMA_FILTERS = [{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME}]


def compress(data: bytes, codec: str) -> bytes:
    """The codec's strongest standard-library setting; lzma: the .xz container (lzma.decompress reads it)."""
    if codec == "lzma":
        return lzma.compress(data, format=lzma.FORMAT_XZ, check=lzma.CHECK_NONE, filters=_LZMA_FILTERS)
    if codec == "bz2":
        return bz2.compress(data, 9)
    if codec == "zlib":
        return zlib.compress(data, 9)
    raise ValueError(f"unknown codec {codec!r}: one of {CODECS}")


def decompress(data: bytes, codec: str) -> bytes:
    return {"lzma": lzma.decompress, "bz2": bz2.decompress, "zlib": zlib.decompress}[codec](data)


# The packed file, line by line (kept short: every byte is counted). Lines 3-5 run the source in this module's
# namespace, as a file: python / torchrun / import set __file__.
_TEMPLATE = (
    "{marker}: {codec}+base85, inner sha256 {sha} ({n} bytes); see bench/pack_code.py\n"
    "import base64,linecache,{codec}\n"
    "_PACKED_SOURCE={codec}.decompress(base64.b85decode(\"{payload}\"))\n"
    "linecache.cache[__file__]=(len(_PACKED_SOURCE),None,_PACKED_SOURCE.decode().splitlines(True),__file__)\n"
    "exec(compile(_PACKED_SOURCE,__file__,\"exec\"))\n")
_PARSE = re.compile(
    rb"\A#packed train_gpt\.py: (lzma|bz2|zlib)\+base85, inner sha256 ([0-9a-f]{64}) \((\d+) bytes\); [^\n]*\n"
    rb"import base64,linecache,\1\n"
    rb"_PACKED_SOURCE=\1\.decompress\(base64\.b85decode\(\"([0-9A-Za-z!#$%&()*+\-;<=>?@^_`{|}~]*)\"\)\)\n"
    rb"linecache\.cache\[__file__\]=\(len\(_PACKED_SOURCE\),None,_PACKED_SOURCE\.decode\(\)\.splitlines\(True\),"
    rb"__file__\)\n"
    rb"exec\(compile\(_PACKED_SOURCE,__file__,\"exec\"\)\)\n\Z")


class PackError(ValueError):
    """A source that cannot be packed (does not compile, a minification that changes the program) or a file that is
    not a well-formed packed file."""


def pack(source: bytes, codec: str = "auto") -> bytes:
    """The packed file's bytes for `source` (UTF-8 Python). codec "auto" picks the smallest packed file."""
    try:
        compile(source, "train_gpt.py", "exec", dont_inherit=True)
    except (SyntaxError, ValueError) as e:
        raise PackError(f"the source does not compile: {e}") from None
    if codec == "auto":
        return min((pack(source, c) for c in CODECS), key=len)
    payload = base64.b85encode(compress(source, codec)).decode("ascii")
    text = _TEMPLATE.format(marker=MARKER.decode(), codec=codec, sha=hashlib.sha256(source).hexdigest(),
                            n=len(source), payload=payload).encode("ascii")
    if unpack(text) != source:  # never write a file that does not give the source back
        raise PackError("internal error: the packed file does not unpack to the source")
    return text


def is_packed(data: bytes) -> bool:
    return data.startswith(MARKER)


def parse_packed(data: bytes) -> dict:
    """codec, the header's sha256 and size, and the inner source, read without running anything. PackError when
    the file starts like a packed file but is not exactly the template, or its source does not match its header."""
    m = _PARSE.match(data)
    if not m:
        raise PackError("not a well-formed packed train_gpt.py (the bench/pack_code.py template)")
    codec = m.group(1).decode()
    try:
        source = decompress(base64.b85decode(m.group(4)), codec)
    except (ValueError, OSError, lzma.LZMAError, zlib.error) as e:
        raise PackError(f"the packed payload does not decompress ({codec}): {e}") from None
    sha = hashlib.sha256(source).hexdigest()
    if sha != m.group(2).decode() or len(source) != int(m.group(3)):
        raise PackError(f"the inner source (sha256 {sha}, {len(source)} bytes) does not match the header "
                        f"(sha256 {m.group(2).decode()}, {int(m.group(3))} bytes)")
    return {"codec": codec, "sha256": sha, "source": source, "source_bytes": len(source), "packed_bytes": len(data)}


def unpack(data: bytes) -> bytes:
    return parse_packed(data)["source"]


def code_identity(data: bytes) -> dict:
    """What a log of this file should say: code_sha256 (of the source that runs) and bytes_code (of the file)."""
    if is_packed(data):
        info = parse_packed(data)
        return {"packed": True, "code_sha256": info["sha256"], "bytes_code": len(data), "codec": info["codec"],
                "source_bytes": info["source_bytes"], "source": info["source"]}
    return {"packed": False, "code_sha256": hashlib.sha256(data).hexdigest(), "bytes_code": len(data),
            "codec": None, "source_bytes": len(data), "source": data}


# ----------------------------------------------------------------------------------------------
# Minification (optional): docstrings and comments out, checked against the syntax tree
# ----------------------------------------------------------------------------------------------


def _strip_docstrings(tree: ast.AST) -> ast.AST:
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                    and isinstance(body[0].value.value, str):
                node.body = body[1:] or [ast.Pass()]
    return tree


def minify(source: bytes) -> bytes:
    """Docstrings and comments removed (ast.unparse). Refused (PackError) unless the result parses to the same tree as
    the docstring-stripped source; `from __future__` imports stay first (unparse keeps statement order)."""
    text = source.decode("utf-8")
    out = ast.unparse(_strip_docstrings(ast.parse(text))) + "\n"
    if ast.dump(ast.parse(out)) != ast.dump(_strip_docstrings(ast.parse(text))):
        raise PackError("minification changed the syntax tree; pack without --minify")
    return out.encode("utf-8")


# ----------------------------------------------------------------------------------------------
# Size table
# ----------------------------------------------------------------------------------------------


def size_rows(source: bytes) -> list[dict]:
    """Per (source form, codec): the source bytes, the compressed payload and the whole packed file."""
    rows = []
    for form, text in (("readable", source), ("minified", minify(source))):
        rows.append({"form": form, "codec": "none", "source_bytes": len(text), "compressed_bytes": None,
                     "packed_bytes": len(text)})
        for codec in CODECS:
            rows.append({"form": form, "codec": codec, "source_bytes": len(text),
                         "compressed_bytes": len(compress(text, codec)), "packed_bytes": len(pack(text, codec))})
    return rows


def size_table(source: bytes) -> str:
    rows = size_rows(source)
    raw = len(source)
    lines = ["| inner source | codec | source bytes | compressed | packed train_gpt.py | vs raw |",
             "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        comp = "" if r["compressed_bytes"] is None else f"{r['compressed_bytes']:,}"
        lines.append(f"| {r['form']} | {r['codec']} | {r['source_bytes']:,} | {comp} | {r['packed_bytes']:,} | "
                     f"{r['packed_bytes'] - raw:+,} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("source", nargs="?", default=DEFAULT_SOURCE, help="the readable train_gpt.py (default: the repo's)")
    ap.add_argument("--out", help="write the packed file (with --unpack: the inner source) here")
    ap.add_argument("--codec", default="auto", choices=("auto", *CODECS))
    ap.add_argument("--minify", action="store_true", help="strip docstrings and comments first (changes the hash)")
    ap.add_argument("--table", action="store_true", help="print raw vs packed sizes per codec, readable and minified")
    ap.add_argument("--unpack", metavar="PACKED", help="print (or --out) the inner source of a packed file")
    args = ap.parse_args(argv)
    try:
        if args.unpack:
            with open(args.unpack, "rb") as f:
                info = parse_packed(f.read())
            if args.out:
                with open(args.out, "wb") as f:
                    f.write(info["source"])
            else:
                sys.stdout.buffer.write(info["source"])
            print(f"pack_code: {args.unpack}: {info['codec']}, {info['packed_bytes']:,} bytes packed, inner "
                  f"{info['source_bytes']:,} bytes sha256 {info['sha256']}", file=sys.stderr)
            return 0
        with open(args.source, "rb") as f:
            source = f.read()
        if args.table:
            print(size_table(source))
        if args.out:
            inner = minify(source) if args.minify else source
            packed = pack(inner, args.codec)
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            with open(args.out, "wb") as f:
                f.write(packed)
            info = parse_packed(packed)
            print(f"pack_code: wrote {args.out}: {len(packed):,} bytes ({info['codec']}), inner source "
                  f"{len(inner):,} bytes sha256 {info['sha256']}" + (" (minified)" if args.minify else ""),
                  file=sys.stderr)
        elif not args.table:
            ap.error("nothing to do: give --out, --table or --unpack")
    except (OSError, PackError) as e:
        print(f"pack_code: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
