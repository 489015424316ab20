"""Compiles ``kernels.cpp`` on first use and loads it with ctypes.

The kernels are built for the machine they run on (``-march=native``) by the system C++
compiler (``$CXX``, default ``c++``). The source includes no torch header and needs no C++
runtime, so a build does not depend on how torch was built. It is compiled once per storage type
(float32, float64, bfloat16), the three side by side, one per core, and linked into one library:
12 to 14 s on two cores, where one compilation of all three took 17 to 25 s (BENCHMARKS.md).
The shared library is cached in ``$XDG_CACHE_HOME/involution`` (default
``~/.cache/involution``) under a name that hashes the source, the flags, the compiler's name and
the CPU: a new source, compiler or machine gets its own build, and later processes load the
cached file in milliseconds (without needing the compiler).

Why not a torch C++ extension: compiling against torch's headers takes about a minute on two
cores and needs ninja, and torch as a build requirement would make pip's isolated build fetch a
second (CUDA) torch. Inductor-generated kernels were not measured against these (BENCHMARKS.md,
CPU section says so).

Threads come from OpenMP (``-fopenmp``). Where torch's runtime is ``libgomp.so.1`` (the x86-64
Linux wheels), the library, linked by that soname, shares it, so its parallel regions run on
torch's own threads. A compiler that fails with ``-fopenmp`` builds without it (cached under
another name), and the kernels then run on one thread; each process that loads them says so in
one warning.

When the compiler is missing or fails, :func:`library` raises :class:`BuildError` saying why; the
first failure is logged as one warning, and dispatch falls back to the portable backend.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from importlib import resources
from pathlib import Path

logger = logging.getLogger(__name__)

SOURCE = "kernels.cpp"
FLAGS = (
    "-O3",
    "-march=native",
    # Fused multiply-adds: GCC contracts by default only in its GNU modes; stated for any compiler.
    "-ffp-contract=fast",
    "-std=gnu++17",
    "-fno-exceptions",
    "-fno-rtti",
    "-fPIC",
    # GCC notes that 64-byte vector arguments changed ABI in GCC 4.6: internal functions only.
    "-Wno-psabi",
)
# Threads (see the module docstring); left out where the compiler fails with it.
OPENMP = ("-fopenmp",)
ENTRY_POINTS = (
    "involution_forward",
    "involution_grad_input",
    "involution_grad_kernel",
    "involution_fused_forward",
    "involution_fused_grad_input",
    "involution_fused_grad_features",
)
# The storage types, one compilation each (kernels.cpp's INVOLUTION_DTYPE codes, in order): an
# entry point of the library is named by symbol().
DTYPES = ("float32", "float64", "bfloat16")


def symbol(entry: str, type_name: str) -> str:
    """The library's name for entry point ``entry`` (of ENTRY_POINTS) of one storage type."""
    return f"{entry}_{type_name}"


# A build that has not finished by then has failed: the first call must not hang.
_BUILD_TIMEOUT_S = 120


class BuildError(RuntimeError):
    """The CPU kernels could not be compiled or loaded; the message says why."""


class _BuildTimeout(BuildError):
    """The compiler did not finish in time (a second build could hang as long again)."""


def cache_dir() -> Path:
    """Where built libraries are kept: ``$XDG_CACHE_HOME/involution`` or ``~/.cache/involution``."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "involution"


def _cpu_identity() -> str:
    """What ``-march=native`` depends on: the CPU's model and feature flags, where Linux says."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return "".join(sorted({line for line in f if line.startswith(("model name", "flags"))}))
    except OSError:
        return f"{platform.machine()} {platform.processor()}"


def _compiler() -> list[str]:
    return shlex.split(os.environ.get("CXX") or "c++")


def _target(source: bytes, compiler: list[str], flags: tuple[str, ...]) -> Path:
    key = hashlib.sha256()
    for part in (source, " ".join(flags).encode(), shlex.join(compiler).encode()):
        key.update(part + b"\0")
    key.update(_cpu_identity().encode())
    return cache_dir() / f"cpu_kernels-{key.hexdigest()[:16]}.so"


@contextlib.contextmanager
def _exclusive(path: Path) -> Iterator[None]:
    """Holds a lock file, so that processes starting together build once (POSIX only)."""
    try:
        import fcntl
    except ImportError:  # Windows: concurrent builds each write their own file; one rename wins
        yield
        return
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _compile(compiler: list[str], flags: tuple[str, ...], source: Path, target: Path) -> None:
    """Builds ``target`` through a temporary file and an atomic rename: one object per storage
    type, compiled side by side (one compiler per core, bfloat16's, the longest, first), then
    linked. On two cores that takes about half the time of one compilation of all three."""
    fd, tmp = tempfile.mkstemp(suffix=".so", prefix=target.stem + ".", dir=target.parent)
    os.close(fd)
    deadline = time.monotonic() + _BUILD_TIMEOUT_S
    try:
        with tempfile.TemporaryDirectory(prefix=target.stem + ".", dir=target.parent) as objects:
            objs = [os.path.join(objects, f"{name}.o") for name in DTYPES]
            compiles = [
                [*compiler, *flags, f"-DINVOLUTION_DTYPE={code}", "-c", str(source), "-o", obj]
                for code, obj in enumerate(objs)
            ]
            _run_all(compiles[::-1], objects, deadline, compiler[0])
            _run_all(
                [[*compiler, *flags, "-shared", *objs, "-o", tmp]], objects, deadline, compiler[0]
            )
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _cores() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _run_all(commands: list[list[str]], logs: str, deadline: float, name: str) -> None:
    """Runs ``commands`` side by side, at most one per core, their output to files in ``logs``.
    Raises BuildError for the first that fails (with its first error line), or when they have
    not all finished by ``deadline``; the others are then stopped."""
    cores = _cores()
    pending = list(enumerate(commands))
    running: dict[int, subprocess.Popen[bytes]] = {}
    try:
        while pending or running:
            while pending and len(running) < cores:
                i, command = pending.pop(0)
                with open(os.path.join(logs, f"{i}.log"), "wb") as log:
                    running[i] = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
            for i, process in list(running.items()):
                if process.poll() is None:
                    continue
                del running[i]
                if process.returncode != 0:
                    with open(
                        os.path.join(logs, f"{i}.log"), encoding="utf-8", errors="replace"
                    ) as log:
                        lines = log.read().strip().splitlines() or ["no output"]
                    first_error = next((line for line in lines if "error" in line), lines[0])
                    raise BuildError(
                        f"{shlex.join(commands[i])} exited with {process.returncode}: {first_error}"
                    )
            if time.monotonic() > deadline:
                raise _BuildTimeout(f"{name} took longer than {_BUILD_TIMEOUT_S} s")
            time.sleep(0.02)
    finally:
        for process in running.values():
            process.kill()
            process.wait()


def _load(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    for name in ENTRY_POINTS:
        for dtype in DTYPES:
            fn = getattr(lib, symbol(name, dtype))
            # (problem, fused operands or null, rows, rows per unit, threads)
            fn.argtypes = [
                ctypes.c_void_p,
                ctypes.c_void_p,
                ctypes.c_int64,
                ctypes.c_int64,
                ctypes.c_int,
            ]
            fn.restype = ctypes.c_int
    return lib


def _build_and_load() -> ctypes.CDLL:
    compiler = _compiler()
    with resources.as_file(resources.files(__package__) / SOURCE) as source:
        try:
            return _built(compiler, (*FLAGS, *OPENMP), source)
        except BuildError as error:
            if isinstance(error, _BuildTimeout):
                raise
            library = _built(compiler, FLAGS, source)
            logger.warning(
                "involution: CPU kernels built without OpenMP, so they run on one thread: %s",
                error,
            )
            return library


def _built(compiler: list[str], flags: tuple[str, ...], source: Path) -> ctypes.CDLL:
    """The library built from ``source`` with ``flags``: from the cache, or compiled now."""
    target = _target(source.read_bytes(), compiler, flags)
    if not target.exists():
        if not compiler or shutil.which(compiler[0]) is None:
            name = compiler[0] if compiler else ""
            raise BuildError(f"C++ compiler {name!r} not found (set CXX to one)")
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            with _exclusive(target.with_suffix(".lock")):
                if not target.exists():
                    start = time.perf_counter()
                    _compile(compiler, flags, source, target)
                    logger.info(
                        "involution: built the CPU kernels in %.1f s: %s",
                        time.perf_counter() - start,
                        target,
                    )
        except OSError as error:
            raise BuildError(f"cannot build in {target.parent}: {error}") from error
    try:
        return _load(target)
    except (OSError, AttributeError) as error:
        raise BuildError(f"cannot load {target}: {error}") from error


_loaded: ctypes.CDLL | BuildError | None = None
_lock = threading.Lock()


def library() -> ctypes.CDLL:
    """The loaded kernels; the first call builds them, or loads them from the cache.

    The outcome is kept for the process: a failure is logged once and raised again on later
    calls without another attempt.

    Raises:
        BuildError: no compiler, a failed compilation, or a library that does not load.
    """
    global _loaded
    if _loaded is None:
        with _lock:
            if _loaded is None:
                try:
                    _loaded = _build_and_load()
                except BuildError as error:
                    logger.warning(
                        "involution: CPU kernels unavailable, using the portable backend: %s",
                        error,
                    )
                    _loaded = error
    if isinstance(_loaded, BuildError):
        raise _loaded
    return _loaded
