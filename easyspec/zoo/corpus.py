"""A deterministic Python-source corpus from the files already on this machine.

No data set can be downloaded where the zoo trains, but every machine carries
megabytes of Python source: the interpreter's standard library, and whatever is
installed in site-packages. This module gathers those files in sorted order,
drops duplicates and oversized or undecodable files, and splits them into train
and held-out sets BY FILE, from a stable hash of each file's labelled relative
path (e.g. "stdlib/json/decoder.py"), so that a file lands on the same side on
every machine and with every cap.

The corpus differs between interpreters (a Python 3.12 stdlib is not a 3.11
one), so `Corpus.summary()` records enough to tell two corpora apart.
"""

from __future__ import annotations

import hashlib
import os
import site
import sys
import sysconfig
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Directory names never entered: caches, VCS metadata, and (inside the stdlib
# root, as with pyenv layouts) the site-packages folders that --site-packages controls.
_SKIP_DIRS = {"__pycache__", ".git", "site-packages", "dist-packages"}

DEFAULT_VAL_FRACTION = 0.02
DEFAULT_MAX_FILE_BYTES = 512 * 1024  # larger .py files are mostly generated tables
_MAX_LINE_CHARS = 1000


@dataclass(frozen=True)
class SourceFile:
    path: str  # root label + relative path, "stdlib/json/decoder.py"
    text: str


@dataclass
class Corpus:
    train: list[SourceFile]
    val: list[SourceFile]
    roots: list[str]  # "label=absolute path" of every root scanned

    def summary(self) -> dict[str, Any]:
        """What training.json records about the data."""
        digest = hashlib.sha256()
        for f in self.train + self.val:
            digest.update(f.path.encode())
            digest.update(hashlib.sha256(f.text.encode()).digest())
        return {
            "python": sys.version.split()[0],
            "roots": self.roots,
            "train_files": len(self.train),
            "val_files": len(self.val),
            "train_chars": sum(len(f.text) for f in self.train),
            "val_chars": sum(len(f.text) for f in self.val),
            "sha256": digest.hexdigest(),
        }


def stable_hash(key: str) -> int:
    """A 64-bit hash that, unlike hash(), is the same in every process and on every machine."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big")


def is_held_out(path: str, fraction: float = DEFAULT_VAL_FRACTION) -> bool:
    return stable_hash(path) % 10_000 < round(fraction * 10_000)


def source_roots(site_packages: bool = False) -> list[tuple[str, Path]]:
    """(label, folder) pairs to scan: the stdlib, then site-packages folders if asked."""
    roots = [("stdlib", Path(sysconfig.get_paths()["stdlib"]))]
    if site_packages:
        found: list[Path] = []
        paths = sysconfig.get_paths()
        for folder in [*site.getsitepackages(), paths["purelib"], paths["platlib"]]:
            resolved = Path(folder).resolve()
            if resolved.is_dir() and resolved not in found:
                found.append(resolved)
        roots += [("site", folder) for folder in found]
    return roots


def _walk_python_files(root: Path) -> Iterator[Path]:
    for folder, dirs, files in os.walk(root):
        # Sorting in place fixes os.walk's descent order, hence the file order.
        dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS and not d.startswith("."))
        for name in sorted(files):
            if name.endswith(".py"):
                yield Path(folder) / name


def _read_source(file: Path, max_file_bytes: int) -> tuple[str, bytes] | None:
    """(text, sha256 of the bytes), or None for a file the corpus should not hold."""
    try:
        if not 0 < file.stat().st_size <= max_file_bytes:
            return None
        raw = file.read_bytes()
        text = raw.decode("utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    lines = text.splitlines()
    # Very long lines mark generated code (serialised protobufs, tables), which teaches nothing.
    if not text.strip() or max(map(len, lines)) > _MAX_LINE_CHARS:
        return None
    return text, hashlib.sha256(raw).digest()


def collect_files(
    roots: Sequence[tuple[str, Path]],
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
    max_bytes: int | None = None,
) -> list[SourceFile]:
    """The usable .py files under `roots`, returned in sorted path order.

    Skipped: files over `max_file_bytes`, empty, not valid UTF-8 or generated-looking
    files, and exact duplicates of a file read earlier (vendored copies would
    otherwise leak between the train and held-out sides). Under a `max_bytes` cap
    files are read in stable-hash order until the cap is reached, so the cap samples
    every package evenly (instead of keeping the alphabetically first) and only
    about `max_bytes` are read.
    """
    candidates: dict[str, Path] = {}
    for label, root in roots:
        for file in _walk_python_files(root):
            candidates.setdefault(f"{label}/{file.relative_to(root).as_posix()}", file)
    order = sorted(candidates, key=stable_hash if max_bytes is not None else None)
    seen_content: set[bytes] = set()
    out: list[SourceFile] = []
    total = 0
    for path in order:
        if max_bytes is not None and total >= max_bytes:
            break
        read = _read_source(candidates[path], max_file_bytes)
        if read is None or read[1] in seen_content:
            continue
        text, digest = read
        size = len(text.encode())
        if max_bytes is not None and total + size > max_bytes:
            continue
        seen_content.add(digest)
        out.append(SourceFile(path, text))
        total += size
    out.sort(key=lambda f: f.path)
    return out


def build_corpus(
    site_packages: bool = False,
    max_bytes: int | None = None,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    roots: Sequence[tuple[str, Path]] | None = None,
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
) -> Corpus:
    """Collect (at most `max_bytes` of UTF-8 source) and split by file; both sides in path order."""
    roots = list(roots) if roots is not None else source_roots(site_packages)
    files = collect_files(roots, max_file_bytes, max_bytes)
    train = [f for f in files if not is_held_out(f.path, val_fraction)]
    val = [f for f in files if is_held_out(f.path, val_fraction)]
    return Corpus(train, val, [f"{label}={root}" for label, root in roots])
