"""Reading, validating and atomically writing bundles."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from sorakit.bundle.manifest import Manifest, check_relative_path
from sorakit.errors import BundleError

MANIFEST = "manifest.json"
STAGING_SUFFIX = ".partial"
PROGRESS = "progress.json"


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def file_record(path: Path) -> dict[str, Any]:
    return {"bytes": path.stat().st_size, "sha256": sha256_file(path)}


class VerifiedStamps:
    """What earlier processes hashed: path -> (size, mtime, inode, sha256), one JSON file per bundle
    in the cache directory. A file whose size, modification time and inode are unchanged since it
    was hashed is not hashed again (a real-size bundle is 24 GB: a minute of hashing per run).
    This guards against damage, not against someone who can write the bundle (they could rewrite
    its manifest too). ``SORAKIT_VERIFY=always`` hashes every time.
    """

    def __init__(self, root: Path):
        from sorakit.cache import default_cache_dir

        key = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:24]
        self.file = default_cache_dir() / "verified" / f"{key}.json"
        self.enabled = os.environ.get("SORAKIT_VERIFY", "") != "always"
        self.data: dict[str, list] | None = None

    def _load(self) -> dict[str, list]:
        if self.data is None:
            self.data = {}
            if self.enabled:
                with contextlib.suppress(OSError, ValueError):
                    loaded = json.loads(self.file.read_text())
                    if isinstance(loaded, dict):
                        self.data = loaded
        return self.data

    @staticmethod
    def _stat(path: Path) -> list[int]:
        st = path.stat()
        return [st.st_size, st.st_mtime_ns, st.st_ino]

    def holds(self, path: Path, sha256: str) -> bool:
        if not self.enabled:
            return False
        rec = self._load().get(str(path))
        return rec is not None and rec == [*self._stat(path), sha256]

    def record(self, path: Path, sha256: str) -> None:
        if not self.enabled:
            return
        self._load()[str(path)] = [*self._stat(path), sha256]
        with contextlib.suppress(OSError):  # a read-only cache only costs the hashing next time
            self.file.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.file.with_name(f"{self.file.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(self.data))
            os.replace(tmp, self.file)


class Bundle:
    """An opened bundle. Paths go through ``path()``, which confines them to the directory.

    ``verify``: "full" hashes every file now; "lazy" (default) checks sizes now and hashes
    each file before its first use (``verify_file``); "none" skips checksums.
    """

    def __init__(self, root: Path, manifest: Manifest, verify: str = "lazy"):
        self.root = root
        self.manifest = manifest
        self._verified: set[str] = set()
        self.verify_mode = verify

    @classmethod
    def open(cls, path: str | Path, verify: str = "lazy") -> Bundle:
        if verify not in ("full", "lazy", "none"):
            raise ValueError(f"verify must be full, lazy or none, not {verify!r}")
        root = Path(path)
        if not root.is_dir():
            if Path(str(root) + STAGING_SUFFIX).is_dir():
                raise BundleError(
                    f"{root} is incomplete: an export into it did not finish ({root}{STAGING_SUFFIX} holds the "
                    "partial work); re-run the export to resume it"
                )
            raise BundleError(f"bundle directory {root} does not exist")
        mf = root / MANIFEST
        if not mf.is_file():
            raise BundleError(f"{root} is not a sorakit bundle (no {MANIFEST})")
        try:
            data = json.loads(mf.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise BundleError(f"{mf} is not valid JSON: {e}") from None
        bundle = cls(root, Manifest.from_dict(data, str(mf)), verify)
        bundle._check_files_present()
        if verify == "full":
            bundle.verify_all()
        return bundle

    # -- paths and checks ----------------------------------------------------------------------
    def path(self, rel: str) -> Path:
        check_relative_path(rel, str(self.root / MANIFEST))
        p = (self.root / rel).resolve()
        root = self.root.resolve()
        if root != p and root not in p.parents:
            raise BundleError(f"{self.root / MANIFEST}: path {rel!r} escapes the bundle directory (via a link)")
        return p

    def _check_files_present(self) -> None:
        for rel, rec in self.manifest.files.items():
            p = self.path(rel)
            if not p.is_file():
                raise BundleError(f"bundle {self.root} is missing {rel}")
            if self.verify_mode != "none" and p.stat().st_size != rec["bytes"]:
                raise BundleError(
                    f"bundle file {rel} has {p.stat().st_size} bytes, the manifest says {rec['bytes']}: "
                    "the file is truncated or was replaced"
                )

    def verify_file(self, rel: str) -> None:
        """Check one file's sha256 (once per process per file; see ``VerifiedStamps`` for later processes)."""
        if self.verify_mode == "none" or rel in self._verified:
            return
        rec = self.manifest.files.get(rel)
        if rec is None:
            raise BundleError(f"bundle file {rel} is not listed in the manifest")
        path = self.path(rel)
        stamps = self._stamps()
        if not stamps.holds(path, rec["sha256"]):
            got = sha256_file(path)
            if got != rec["sha256"]:
                raise BundleError(f"bundle file {rel} is corrupt: sha256 {got[:12]}… but the manifest says "
                                  f"{rec['sha256'][:12]}…")
            stamps.record(path, got)
        self._verified.add(rel)

    def _stamps(self) -> VerifiedStamps:
        if not hasattr(self, "_stamp_cache"):
            self._stamp_cache = VerifiedStamps(self.root)
        return self._stamp_cache

    def verify_graph_files(self, graph) -> None:
        for rel in graph.files():
            self.verify_file(rel)

    def verify_all(self) -> None:
        for rel in self.manifest.files:
            self.verify_file(rel)

    def read_json(self, rel: str) -> Any:
        return json.loads(self.path(rel).read_text())


# ---------------------------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------------------------
class BundleStaging:
    """Build a bundle in ``<out>.partial`` and move it into place only when complete.

    The staging directory survives a crash; ``done()`` records each finished graph with a
    settings key, and a re-run that finds the same key and an intact file skips the work.
    A complete bundle already at ``<out>`` is left untouched until the new one is complete.
    """

    def __init__(self, out: str | Path):
        self.out = Path(out)
        if self.out.exists() and not (self.out / MANIFEST).is_file():
            if not self.out.is_dir() or any(self.out.iterdir()):
                raise BundleError(
                    f"output {self.out} exists and is not a sorakit bundle; choose another path or remove it"
                )
        self.dir = Path(str(self.out) + STAGING_SUFFIX)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.progress: dict[str, dict[str, Any]] = {}
        pf = self.dir / PROGRESS
        if pf.is_file():
            with contextlib.suppress(json.JSONDecodeError):
                self.progress = json.loads(pf.read_text())
        self._adopt_previous_bundle()

    def _adopt_previous_bundle(self) -> None:
        """Copy finished files of an existing complete bundle, so they can be reused."""
        prev = self.out / PROGRESS
        if not (self.out / MANIFEST).is_file() or not prev.is_file():
            return
        with contextlib.suppress(json.JSONDecodeError, OSError):
            for key, rec in json.loads(prev.read_text()).items():
                if key in self.progress:
                    continue
                ok = True
                for rel in rec.get("files", {}):
                    src, dst = self.out / rel, self.dir / rel
                    if not src.is_file():
                        ok = False
                        break
                    if not dst.exists():
                        dst.parent.mkdir(parents=True, exist_ok=True)
                        shutil.copy2(src, dst)  # not a hard link: onnx refuses hard-linked external data
                if ok:
                    self.progress[key] = rec

    def file(self, rel: str) -> Path:
        check_relative_path(rel)
        p = self.dir / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def is_done(self, key: str, settings: str) -> bool:
        rec = self.progress.get(key)
        if not rec or rec.get("settings") != settings:
            return False
        for rel, want in rec.get("files", {}).items():
            p = self.dir / rel
            if not p.is_file() or p.stat().st_size != want["bytes"] or sha256_file(p) != want["sha256"]:
                return False
        return True

    def done(self, key: str, settings: str, files: list[str], extra: dict[str, Any] | None = None) -> None:
        rec = {"settings": settings, "files": {rel: file_record(self.dir / rel) for rel in files}}
        if extra:
            rec["extra"] = extra
        self.progress[key] = rec
        self._write_json(PROGRESS, self.progress)

    def extra(self, key: str) -> dict[str, Any]:
        return self.progress.get(key, {}).get("extra", {})

    def _write_json(self, rel: str, data: Any) -> None:
        tmp = self.dir / (rel + ".tmp")
        tmp.write_text(json.dumps(data, indent=1))
        os.replace(tmp, self.dir / rel)

    def records(self, rels: list[str]) -> dict[str, dict[str, Any]]:
        out = {}
        for rel in rels:
            for rec in self.progress.values():
                if rel in rec.get("files", {}):
                    out[rel] = rec["files"][rel]
                    break
            else:
                out[rel] = file_record(self.dir / rel)
        return out

    def commit(self, manifest: Manifest) -> Path:
        """Write the manifest and move the staging directory to ``out`` atomically."""
        manifest.check_consistency()
        for rel in manifest.files:
            if not (self.dir / rel).is_file():
                raise BundleError(f"cannot finish bundle: {rel} was never written")
        for stray in [p for p in self.dir.rglob("*") if p.is_file()]:
            rel = stray.relative_to(self.dir).as_posix()
            if rel not in manifest.files and rel not in (PROGRESS, MANIFEST):
                stray.unlink()  # left over from an earlier run with other settings
        self._write_json(MANIFEST, manifest.to_dict())
        old = None
        if self.out.exists():
            old = Path(f"{self.out}.old-{os.getpid()}-{int(time.time())}")
            os.replace(self.out, old)
        os.replace(self.dir, self.out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return self.out


def disk_full_message(e: OSError, what: str) -> str | None:
    if e.errno == errno.ENOSPC:
        return f"the disk is full while writing {what}; free space and re-run to resume"
    return None
