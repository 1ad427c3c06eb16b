"""The per-run records of the proxy-fidelity scripts: every script reads and writes them through ``Records``.

A record is one JSON file named by its path under run.py's work directory (``--out``, by default
``results/proxy_fidelity``): ``runs/<candidate>.json``, ``replicates/<candidate>.<tag>.json``,
``settle/<candidate>.json``, ``sweep/<setting>/<candidate>.json``, ``ema_check/<candidate>.seed<k>.json``
(``runs_teacher_v1/`` holds first runs on an earlier teacher, read by no script). The first path
component is the record's kind. Two places hold them:

- ``<out>/<kind>.tar.xz``: the packed records of one kind, a tar archive (xz) whose members are the
  JSON files as the scripts wrote them, under the same names (``tar -xJf runs.tar.xz`` in ``<out>``
  gives ``runs/...`` back);
- ``<out>/<name>``: a loose record, written by a script since the last pack. A loose record is read
  in place of an archived one of the same name (a script that updates a record writes it loose).

``pack`` folds the loose records of every kind into that kind's archive and deletes them:

    python -m experiments.research.proxy_fidelity.records pack --out results/proxy_fidelity
    python -m experiments.research.proxy_fidelity.records list --out results/proxy_fidelity 'replicates/*.json'

Only the standard library is used (tarfile, lzma, json); the archives are reproducible (members sorted,
no timestamps or owners), so packing the same records twice gives the same bytes.
"""

from __future__ import annotations

import argparse
import fnmatch
import io
import json
import os
import sys
import tarfile
from pathlib import Path

SUFFIX = ".tar.xz"
# the kinds of record (a script that keeps a new kind adds it here); the other folders of a work
# directory (exported U-Nets: <candidate>-long/, replicates/<tag>/) hold no records
KINDS = ("runs", "runs_teacher_v1", "replicates", "settle", "sweep", "ema_check")
# where a kind's records sit below its folder; every other kind: <kind>/*.json
LAYOUT = {"sweep": "sweep/*/*.json"}

_ARCHIVES: dict[Path, tuple[tuple[int, int], dict[str, bytes]]] = {}  # archive -> ((mtime_ns, size), members)


def pattern_of(kind: str) -> str:
    """The names of ``kind``'s records, as a pattern of ``matches``."""
    return LAYOUT.get(kind, f"{kind}/*.json")


def matches(name: str, pattern: str) -> bool:
    """Whether the record name ``name`` matches ``pattern`` part by part (a ``*`` never spans a ``/``)."""
    a, b = name.split("/"), pattern.split("/")
    return len(a) == len(b) and all(fnmatch.fnmatchcase(x, y) for x, y in zip(a, b))


def _key(name: str) -> list[str]:
    """The order of ``sorted(Path.glob(...))``: by path parts."""
    return name.split("/")


def _read_archive(path: Path) -> dict[str, bytes]:
    st = path.stat()
    stamp = (st.st_mtime_ns, st.st_size)
    cached = _ARCHIVES.get(path)
    if cached and cached[0] == stamp:
        return cached[1]
    members: dict[str, bytes] = {}
    with tarfile.open(path, "r:xz") as tf:
        for m in tf:
            if m.isfile():
                members[m.name] = tf.extractfile(m).read()
    _ARCHIVES[path] = (stamp, members)
    return members


def _write_archive(path: Path, members: dict[str, bytes]) -> None:
    """``members`` as a reproducible tar.xz at ``path`` (written beside it, then moved into place)."""
    tmp = path.with_name(path.name + ".tmp")
    with tarfile.open(tmp, "w:xz", preset=9, format=tarfile.PAX_FORMAT) as tf:
        for name in sorted(members, key=_key):
            data = members[name]
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            tf.addfile(info, io.BytesIO(data))
    os.replace(tmp, path)
    _ARCHIVES.pop(path, None)


class Records:
    """The records under one work directory ``out``, archived and loose."""

    def __init__(self, out: str | Path):
        self.out = Path(out)

    def archive(self, kind: str) -> Path:
        return self.out / f"{kind}{SUFFIX}"

    def _archived(self, kind: str) -> dict[str, bytes]:
        path = self.archive(kind)
        return _read_archive(path) if path.is_file() else {}

    def _loose(self, pattern: str) -> list[str]:
        return [p.relative_to(self.out).as_posix() for p in self.out.glob(pattern) if p.is_file()]

    def names(self, pattern: str) -> list[str]:
        """The names of the records that match ``pattern`` (e.g. ``replicates/*.json``), archived or loose,
        in the order of ``sorted(Path.glob(...))``."""
        kind = pattern.split("/", 1)[0]
        found = {n for n in self._archived(kind) if matches(n, pattern)} | set(self._loose(pattern))
        return sorted(found, key=_key)

    def exists(self, name: str) -> bool:
        return (self.out / name).is_file() or name in self._archived(name.split("/", 1)[0])

    def read(self, name: str) -> dict:
        """The record ``name``: the loose file if there is one, else the archive's member; FileNotFoundError
        when neither holds it."""
        f = self.out / name
        if f.is_file():
            return json.loads(f.read_text())
        data = self._archived(name.split("/", 1)[0]).get(name)
        if data is None:
            raise FileNotFoundError(f"{f}: no such record (loose, or in {self.archive(name.split('/', 1)[0])})")
        return json.loads(data.decode("utf-8"))

    def write(self, name: str, record: dict) -> Path:
        """``record`` as the loose record ``name`` (JSON, indent 1, as the scripts have always written it);
        ``pack`` folds it into its kind's archive. Returns the file written."""
        kind = name.split("/", 1)[0]
        if kind not in KINDS or not matches(name, pattern_of(kind)):
            raise ValueError(f"{name!r} is no record name (kinds: {', '.join(KINDS)}; {kind}: {pattern_of(kind)})")
        f = self.out / name
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(json.dumps(record, indent=1))
        return f

    def kinds(self) -> list[str]:
        """The kinds with an archive or a folder here."""
        return [k for k in KINDS if self.archive(k).is_file() or (self.out / k).is_dir()]

    def pack(self, kinds: list[str] | None = None) -> dict[str, int]:
        """Fold the loose records of ``kinds`` (default: all) into their archives (a loose record replaces
        an archived one of the same name) and delete them, and their folders where that leaves them
        empty. Returns how many records each archive took in."""
        done = {}
        for kind in kinds or self.kinds():
            loose = sorted(self._loose(pattern_of(kind)), key=_key)
            if not loose:
                continue
            members = dict(self._archived(kind))
            for name in loose:
                data = (self.out / name).read_bytes()
                json.loads(data.decode("utf-8"))  # a record is JSON: refuse to pack anything else
                members[name] = data
            _write_archive(self.archive(kind), members)
            for name in loose:
                (self.out / name).unlink()
            for d in sorted({(self.out / n).parent for n in loose}, key=lambda p: len(p.parts), reverse=True):
                while d != self.out and d.is_dir() and not any(d.iterdir()):
                    d.rmdir()
                    d = d.parent
            done[kind] = len(loose)
        return done


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("command", choices=("pack", "list"), help="pack: fold loose records into the archives; list: name the records")
    ap.add_argument("pattern", nargs="?", default=None, help="list: the records to name (e.g. 'replicates/*.json'; default: all)")
    ap.add_argument("--out", default="results/proxy_fidelity", help="run.py's work directory")
    args = ap.parse_args(argv)
    store = Records(args.out)
    if not store.out.is_dir():
        ap.error(f"--out {store.out}: no such directory")
    if args.command == "pack":
        done = store.pack()
        for kind, n in done.items():
            print(f"{store.archive(kind)}: {n} loose record{'s' if n != 1 else ''} packed", file=sys.stderr)
        if not done:
            print("no loose records", file=sys.stderr)
        return 0
    patterns = [args.pattern] if args.pattern else [pattern_of(k) for k in store.kinds()]
    for p in patterns:
        for name in store.names(p):
            print(name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
