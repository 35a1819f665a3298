"""The model registry (models.toml) and turning a name or a path into a checked GGUF file."""
from __future__ import annotations

import hashlib
import os
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from ._shim import cache_dir
from .errors import ModelError, UnsupportedModelError

REGISTRY_PATH = Path(__file__).resolve().parent / "models.toml"


@dataclass(frozen=True)
class ModelEntry:
    name: str
    description: str
    architecture: str
    packages: tuple[str, ...]
    files: tuple[str, ...]
    sha256: str
    context: int


def registry() -> tuple[str, dict[str, ModelEntry]]:
    data = tomllib.loads(REGISTRY_PATH.read_text())
    entries = {
        name: ModelEntry(name=name, description=m["description"], architecture=m["architecture"],
                         packages=tuple(m["packages"]), files=tuple(m["files"]),
                         sha256=m["sha256"], context=int(m["context"]))
        for name, m in data["models"].items()
    }
    return data["default"], entries


def _package_file(package: str, rel: str) -> Path | None:
    """The file `rel` as installed by distribution `package`, or None."""
    try:
        dist = metadata.distribution(package)
    except metadata.PackageNotFoundError:
        return None
    for f in dist.files or ():
        if f.as_posix() == rel:
            return Path(dist.locate_file(f)).resolve()
    return None


def _verify_sha256(path: Path, expected: str) -> None:
    """Check a file's sha256 once per (path, size, mtime); the result is remembered."""
    st = path.stat()
    key = hashlib.sha256(f"{path}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:24]
    marker = cache_dir() / "verified" / key
    if marker.exists() and marker.read_text() == expected:
        return
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    if h.hexdigest() != expected:
        raise ModelError(f"{path} is damaged: sha256 {h.hexdigest()} instead of {expected}; "
                         "reinstall the package that ships it")
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(expected)


def _assemble(entry: ModelEntry) -> Path:
    """Concatenate a multi-part model from its installed packages into the cache (once)."""
    out = cache_dir() / "models" / f"{entry.name}.gguf"
    if out.exists():
        return out
    parts = [_package_file(p, f) for p, f in zip(entry.packages, entry.files)]
    missing = [p for p, path in zip(entry.packages, parts) if path is None]
    if missing:
        raise ModelError(f"model {entry.name!r} comes in {len(parts)} parts; not installed: "
                         f"pip install {' '.join(missing)}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    total = sum(p.stat().st_size for p in parts)
    done = 0
    h = hashlib.sha256()
    try:
        with open(tmp, "wb") as dst:
            for part in parts:
                with open(part, "rb") as src:
                    for block in iter(lambda: src.read(1 << 22), b""):
                        dst.write(block)
                        h.update(block)
                        done += len(block)
                print(f"llamakv: assembling {entry.name}: {done / 2**20:.0f}/{total / 2**20:.0f} MiB",
                      file=sys.stderr, flush=True)
        if h.hexdigest() != entry.sha256:
            raise ModelError(f"the parts of {entry.name!r} assemble to sha256 {h.hexdigest()}, "
                             f"not {entry.sha256}: reinstall {' '.join(entry.packages)}")
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    return out


def resolve_model(model: str | os.PathLike | None) -> Path:
    """A path to a GGUF file, or a registry name (None: the default model)."""
    default, entries = registry()
    if model is None:
        model = default
    name = str(model)
    if name in entries:
        entry = entries[name]
        if len(entry.files) == 1:
            path = _package_file(entry.packages[0], entry.files[0])
            if path is None:
                raise ModelError(f"model {name!r} is shipped by the PyPI package {entry.packages[0]!r}, "
                                 f"which is not installed: pip install {entry.packages[0]}")
        else:
            path = _assemble(entry)
        _verify_sha256(path, entry.sha256)
        return path
    path = Path(name).expanduser()
    if not path.exists():
        known = ", ".join(sorted(entries))
        raise ModelError(f"no model file at {path} (and {name!r} is not a known model name: {known})")
    if not path.is_file():
        raise ModelError(f"{path} is not a file")
    return path.resolve()


def check_gguf(path: Path, supported: dict | None = None) -> str:
    """Check that the file is a readable GGUF of a supported architecture; returns the
    architecture. Reads only the header, so it fails fast before llama.cpp loads anything."""
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ModelError(f"{path} is not a GGUF file (it starts with {magic!r}, not b'GGUF')")
    try:
        from gguf import GGUFReader

        reader = GGUFReader(str(path))
        field = reader.get_field("general.architecture")
        arch = field.contents() if field is not None else None
    except Exception as e:  # the gguf reader raises many kinds on damaged files
        raise ModelError(f"{path} is a damaged GGUF file: {type(e).__name__}: {e}") from e
    if not arch:
        raise ModelError(f"{path} has no general.architecture: not a llama.cpp model")
    if supported is not None and arch not in supported:
        raise UnsupportedModelError(
            f"{path}: architecture {arch!r} is not supported yet "
            f"(supported: {', '.join(sorted(supported))})")
    return arch


def describe_registry() -> str:
    default, entries = registry()
    lines = []
    for name, e in entries.items():
        assembled = cache_dir() / "models" / f"{name}.gguf"
        if len(e.files) > 1 and not assembled.exists():  # listing never assembles
            have = sum(_package_file(p, f) is not None for p, f in zip(e.packages, e.files))
            where = f"{have} of {len(e.files)} parts installed; assembled into {assembled} on first use"
        else:
            try:
                where = str(resolve_model(name))
            except ModelError as err:
                where = f"not available ({err})"
        mark = " (default)" if name == default else ""
        lines.append(f"{name}{mark}: {e.description}\n    {where}")
    return "\n".join(lines)

