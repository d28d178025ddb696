"""The training corpus: Python source files already present on the machine, recorded in a manifest.

Nothing is downloaded. The corpus is the standard library of the running interpreter
(`sysconfig.get_paths()["stdlib"]`, under the PSF license) and, optionally, the Python sources of installed
distributions (license read from each distribution's metadata). The manifest records every file with its
sha256 so a model card can say exactly what the model saw, and so a reader can detect that a file changed
since the manifest was written.

Invariants:
- One document is one file. Files with identical content appear once (the first in sorted order), so a
  duplicate can never sit on both sides of the train/held-out split.
- The split depends only on a file's content hash: the same file is held out on every machine.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.metadata
import json
import os
import platform
import sysconfig
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass

MANIFEST_VERSION = 1
STDLIB = "python-stdlib"
PSF_LICENSE = "PSF-2.0"
# Directories of the stdlib that are not the stdlib's own source.
_STDLIB_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}


@dataclass(frozen=True)
class CorpusSource:
    """Where a group of files came from and under which license."""

    name: str          # "python-stdlib" or a distribution name
    version: str
    license: str
    root: str          # absolute directory the files' paths are relative to (machine-specific)


@dataclass(frozen=True)
class CorpusFile:
    source: str        # CorpusSource.name
    path: str          # relative to the source's root, '/'-separated
    sha256: str
    num_bytes: int
    split: str         # "train" | "heldout"


@dataclass(frozen=True)
class Manifest:
    sources: tuple[CorpusSource, ...]
    files: tuple[CorpusFile, ...]
    heldout_fraction: float
    python_version: str
    corpus_sha256: str  # hash over the sorted (source, path, sha256) triples: one number names the corpus

    def source(self, name: str) -> CorpusSource:
        for s in self.sources:
            if s.name == name:
                return s
        raise KeyError(name)

    def files_of(self, split: str) -> list[CorpusFile]:
        if split not in ("train", "heldout"):
            raise ValueError(f"split: must be 'train' or 'heldout', got {split!r}")
        return [f for f in self.files if f.split == split]

    def num_bytes(self, split: str | None = None) -> int:
        return sum(f.num_bytes for f in self.files if split is None or f.split == split)

    def to_json(self) -> dict:
        return {"version": MANIFEST_VERSION, "python_version": self.python_version,
                "heldout_fraction": self.heldout_fraction, "corpus_sha256": self.corpus_sha256,
                "num_files": len(self.files), "num_bytes": self.num_bytes(),
                "sources": [asdict(s) for s in self.sources], "files": [asdict(f) for f in self.files]}

    def save(self, path: str) -> None:
        """JSON; gzip-compressed when the name ends in .gz (a copy shipped beside a model card)."""
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = path + ".tmp"
        with (gzip.open(tmp, "wt") if path.endswith(".gz") else open(tmp, "w")) as f:
            json.dump(self.to_json(), f, indent=None if path.endswith(".gz") else 1)
        os.replace(tmp, path)

    @staticmethod
    def load(path: str) -> "Manifest":
        if not os.path.isfile(path):
            raise ValueError(f"manifest: no such file {path!r}")
        with (gzip.open(path, "rt") if path.endswith(".gz") else open(path)) as f:
            d = json.load(f)
        if d.get("version") != MANIFEST_VERSION:
            raise ValueError(f"manifest: {path} has version {d.get('version')!r}, expected {MANIFEST_VERSION}")
        return Manifest(sources=tuple(CorpusSource(**s) for s in d["sources"]),
                        files=tuple(CorpusFile(**f) for f in d["files"]),
                        heldout_fraction=float(d["heldout_fraction"]), python_version=d["python_version"],
                        corpus_sha256=d["corpus_sha256"])


def is_heldout(sha256: str, heldout_fraction: float) -> bool:
    """Deterministic split by content: the first 8 hex digits of the hash as a fraction of 2**32."""
    return int(sha256[:8], 16) < heldout_fraction * 2 ** 32


def stdlib_source() -> tuple[CorpusSource, list[str]]:
    root = sysconfig.get_paths()["stdlib"]
    paths = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _STDLIB_SKIP_DIRS)
        paths.extend(os.path.relpath(os.path.join(dirpath, n), root) for n in filenames if n.endswith(".py"))
    return CorpusSource(STDLIB, platform.python_version(), PSF_LICENSE, root), paths


def distribution_license(dist: importlib.metadata.Distribution) -> str:
    """The license a distribution declares: License-Expression, else the License field's first line,
    else its 'License ::' classifiers; 'UNKNOWN' when it declares none."""
    meta = dist.metadata
    expression = meta.get("License-Expression")
    if expression:
        return expression.strip()
    text = (meta.get("License") or "").strip()
    if text and text.upper() != "UNKNOWN" and "\n" not in text and len(text) <= 80:
        return text
    classifiers = [c.split("::")[-1].strip() for c in (meta.get_all("Classifier") or [])
                   if c.startswith("License ::")]
    if classifiers:
        return " AND ".join(classifiers)
    return text.splitlines()[0][:80] if text else "UNKNOWN"


def package_source(name: str) -> tuple[CorpusSource, list[str]]:
    try:
        dist = importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
        raise ValueError(f"packages: distribution {name!r} is not installed") from None
    root = os.path.abspath(str(dist.locate_file("")))
    paths = sorted(str(p) for p in (dist.files or []) if str(p).endswith(".py") and not str(p).startswith(".."))
    return CorpusSource(dist.metadata["Name"] or name, dist.version, distribution_license(dist), root), paths


def _sha256_file(path: str) -> tuple[str, int]:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        data = f.read()
    h.update(data)
    return h.hexdigest(), len(data)


def _is_utf8(path: str) -> bool:
    try:
        with open(path, encoding="utf-8") as f:
            f.read()
        return True
    except (UnicodeDecodeError, OSError):
        return False


def build_manifest(include_stdlib: bool = True, packages: Iterable[str] = (), heldout_fraction: float = 0.02,
                   max_file_bytes: int = 1 << 20) -> Manifest:
    """Collect the corpus. Files that are not UTF-8 text, empty, or larger than `max_file_bytes`
    (generated tables) are left out."""
    if not 0.0 <= heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction: must be in [0, 1), got {heldout_fraction}")
    found = ([stdlib_source()] if include_stdlib else []) + [package_source(p) for p in packages]
    if not found:
        raise ValueError("corpus: no source selected (stdlib disabled and no packages given)")
    sources, files, seen = [], [], set()
    for source, paths in found:
        sources.append(source)
        for rel in sorted(paths):
            full = os.path.join(source.root, rel)
            if not os.path.isfile(full):
                continue
            size = os.path.getsize(full)
            if size == 0 or size > max_file_bytes or not _is_utf8(full):
                continue
            digest, size = _sha256_file(full)
            if digest in seen:
                continue
            seen.add(digest)
            split = "heldout" if is_heldout(digest, heldout_fraction) else "train"
            files.append(CorpusFile(source.name, rel.replace(os.sep, "/"), digest, size, split))
    h = hashlib.sha256()
    for f in sorted(files, key=lambda f: (f.source, f.path)):
        h.update(f"{f.source}\0{f.path}\0{f.sha256}\n".encode())
    return Manifest(tuple(sources), tuple(files), heldout_fraction, platform.python_version(), h.hexdigest())


def read_document(manifest: Manifest, file: CorpusFile, verify: bool = True) -> str:
    """The text of one corpus file; raises if it changed since the manifest was written."""
    path = os.path.join(manifest.source(file.source).root, file.path)
    with open(path, "rb") as f:
        data = f.read()
    if verify and hashlib.sha256(data).hexdigest() != file.sha256:
        raise ValueError(f"corpus: {path} changed since the manifest was written (sha256 differs)")
    return data.decode("utf-8")


def iter_documents(manifest: Manifest, split: str) -> Iterator[str]:
    for file in manifest.files_of(split):
        yield read_document(manifest, file)


def license_summary(manifest: Manifest) -> list[dict[str, object]]:
    """Per source: name, version, license, files and bytes used (what a model card lists)."""
    out = []
    for s in manifest.sources:
        files = [f for f in manifest.files if f.source == s.name]
        out.append({"name": s.name, "version": s.version, "license": s.license, "num_files": len(files),
                    "num_bytes": sum(f.num_bytes for f in files)})
    return out
