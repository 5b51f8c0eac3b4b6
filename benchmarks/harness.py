"""What every benchmark script shares: environment record, timing, memory, result files.

The scripts import it as a sibling module (``from harness import ...``), like ``llama3_8b``:
``python benchmarks/bench_x.py`` puts ``benchmarks/`` on ``sys.path``. Each script keeps only
its own experiment and the keys of its own result files; this module imports torch lazily, so
``--help`` and report-only paths stay fast.

- environment: :func:`describe_environment` (the full record: machine, CPU/GPU, versions, git
  revision, engine source digest) and the pieces the scripts with smaller records use
  (:func:`utc_now`, :func:`command_line`, :func:`cpu_model`, :func:`git_revision`...);
- timing: :class:`Timer` (CUDA events on the GPU, ``perf_counter`` on the CPU; median of
  repeats), :func:`sync`, :func:`log`;
- memory: :class:`RssSampler` (peak resident set size, sampled in a thread), :func:`current_rss`,
  :func:`ru_maxrss`, :func:`cuda_peak_bytes`;
- results: :func:`write_text_atomic`, :func:`write_json`, :func:`write_report` (``<prefix>.json``
  and ``<prefix>.md``), :func:`md_table`, :func:`md_cell`;
- subprocess workers: :func:`script_command` (this script again, in a fresh interpreter).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import os
import platform
import re
import resource
import shlex
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
#: The data shared between checkouts (C4 subset, WikiText-2, zero-shot tasks).
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
MiB = 2**20


def use_source_tree() -> None:
    """Import ``optishear_lightning`` from this checkout's ``src/`` even when not installed."""
    if (REPO_ROOT / "src" / "optishear_lightning").is_dir():
        sys.path.insert(0, str(REPO_ROOT / "src"))


# --------------------------------------------------------------------------------------------
# Environment
# --------------------------------------------------------------------------------------------


def utc_now(fmt: str = "%Y-%m-%d %H:%M:%S UTC") -> str:
    """The current UTC time as ``fmt`` (default ``2025-01-31 12:00:00 UTC``)."""
    return dt.datetime.now(dt.timezone.utc).strftime(fmt)


def command_line(
    argv: Sequence[str] | None = None, *, prefix: str = "python ", quote: bool = True
) -> str:
    """The command that started this script: ``prefix`` + ``sys.argv[0]`` + ``argv``.

    Args:
        argv: the arguments (default ``sys.argv[1:]``).
        prefix: text before the script path.
        quote: shell-quote every word (``shlex.join``); otherwise join them with spaces.
    """
    words = [sys.argv[0], *(argv if argv is not None else sys.argv[1:])]
    return prefix + (shlex.join(words) if quote else " ".join(words))


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` knows."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def ram_bytes() -> int | None:
    """Total memory of the machine (``/proc/meminfo``), ``None`` where unknown."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    return None


def usable_cpus() -> int | None:
    """CPU cores this process may run on (its affinity), ``None`` where unknown."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None


def package_version(name: str) -> str:
    """Installed version of ``name``; for this package in a source tree, pyproject's version."""
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        pass
    if name == "optishear-lightning":
        with contextlib.suppress(OSError):
            m = re.search(
                r'^version\s*=\s*"([^"]+)"', (REPO_ROOT / "pyproject.toml").read_text(), re.M
            )
            if m:
                return f"{m.group(1)} (source tree, not installed)"
    return "not installed"


def src_digest() -> str | None:
    """SHA-256 (12 hex digits) of the engine's source files, to tell which code a row ran."""
    files = sorted((REPO_ROOT / "src" / "optishear_lightning").glob("*.py"))
    if not files:
        return None
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:12]


def git_revision(abbrev: int | None = 12) -> str | None:
    """``HEAD``'s short hash, plus `` (src/ modified)`` when tracked files under ``src/`` differ.

    Args:
        abbrev: hash length (``None``: git's default for ``--short``).

    Returns ``None`` outside a git checkout or without git.
    """
    git = ["git", "--no-optional-locks", "-C", str(REPO_ROOT)]
    short = "--short" if abbrev is None else f"--short={abbrev}"
    try:
        rev = subprocess.run(
            [*git, "rev-parse", short, "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            [*git, "status", "--porcelain", "--untracked-files=no", "src"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        return rev + (" (src/ modified)" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def optional_version(module: str) -> str | None:
    """``module.__version__``, or ``None`` when it cannot be imported."""
    try:
        return __import__(module).__version__
    except ImportError:
        return None


def describe_environment(device: str) -> dict[str, Any]:
    """The full environment record: date, machine, CPU, GPU, versions, git, engine digest."""
    import torch

    env: dict[str, Any] = {
        "date_utc": utc_now(),
        "hostname": platform.node(),
        "os": platform.platform(),
        "cpu": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "cpu_affinity": usable_cpus(),
        "torch_threads": torch.get_num_threads(),
        "ram_bytes": ram_bytes(),
        "gpu": None,
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": package_version("transformers"),
            "optishear_lightning": package_version("optishear-lightning"),
            "gguf": package_version("gguf"),
            "torchmetrics": package_version("torchmetrics"),
        },
        "git_revision": git_revision(),
        "src_digest": src_digest(),
    }
    if torch.cuda.is_available():
        index = torch.device(device).index or 0 if device.startswith("cuda") else 0
        props = torch.cuda.get_device_properties(index)
        env["gpu"] = {
            "name": torch.cuda.get_device_name(index),
            "memory_bytes": props.total_memory,
            "count": torch.cuda.device_count(),
            "cuda": torch.version.cuda,
        }
    return env


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------


def log(msg: str) -> None:
    """``[HH:MM:SS] msg`` on stderr."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def sync(device: Any) -> None:
    """Wait for the GPU's queued work when ``device`` is a CUDA device (wall times need it)."""
    import torch

    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


class Timer:
    """Wall time of a callable: CUDA events on the GPU, ``perf_counter`` on the CPU."""

    def __init__(self, device: Any):
        import torch

        self.cuda = torch.device(device).type == "cuda"

    def __call__(self, fn: Callable[[], Any], before: Callable[[], Any] | None = None) -> float:
        """Seconds of one ``fn()``; ``before()`` runs first, untimed."""
        import torch

        if before is not None:
            before()
        if self.cuda:
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t

    def median(
        self,
        fn: Callable[[], Any],
        repeats: int,
        warmup: int = 1,
        before: Callable[[], Any] | None = None,
    ) -> dict[str, Any]:
        """``{"median_s", "times_s"}`` of ``repeats`` timed calls after ``warmup`` untimed ones."""
        for _ in range(warmup):
            self(fn, before)
        times = [self(fn, before) for _ in range(repeats)]
        return {"median_s": statistics.median(times), "times_s": times}


# --------------------------------------------------------------------------------------------
# Memory
# --------------------------------------------------------------------------------------------


def current_rss() -> int | None:
    """This process's resident set size now (``/proc/self/statm``), ``None`` where unknown."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE")


def ru_maxrss() -> int:
    """This process's peak resident set size so far, in bytes."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def cuda_peak_bytes(device: Any = None) -> int | None:
    """``torch.cuda.max_memory_allocated(device)``, ``None`` without CUDA."""
    import torch

    return torch.cuda.max_memory_allocated(device) if torch.cuda.is_available() else None


class RssSampler:
    """Peak of the process's current RSS, sampled every ``interval`` seconds in a thread."""

    def __init__(self, interval: float = 0.005):
        self.interval = interval
        self.peak = current_rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _sample(self) -> None:
        rss = current_rss()
        if rss is not None and (self.peak is None or rss > self.peak):
            self.peak = rss

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


# --------------------------------------------------------------------------------------------
# Result files
# --------------------------------------------------------------------------------------------


def write_text_atomic(path: Path | str, text: str) -> None:
    """Write ``text`` to a hidden sibling, then rename it over ``path`` (never half-written)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json(
    path: Path | str,
    data: Any,
    *,
    indent: int = 1,
    end: str = "\n",
    default: Callable[[Any], Any] | None = None,
) -> None:
    """``json.dumps(data, indent=indent, default=default) + end``, written atomically."""
    write_text_atomic(path, json.dumps(data, indent=indent, default=default) + end)


def write_report(prefix: Path | str, report: Any, markdown: str, *, end: str = "\n") -> None:
    """``<prefix>.json`` (the raw report, indent 1) and ``<prefix>.md`` (``markdown``)."""
    prefix = Path(prefix)
    write_json(prefix.with_suffix(".json"), report, end=end)
    write_text_atomic(prefix.with_suffix(".md"), markdown)


_ALIGN = {"l": "---", "r": "---:", "c": ":---:"}


def md_table(columns: Sequence[str], rows: Iterable[Sequence[Any]], align: str = "") -> list[str]:
    """Lines of a Markdown table.

    Args:
        columns: the header cells.
        rows: the body rows, one sequence of cells each (``str()`` of each cell, not escaped:
            see :func:`md_cell`).
        align: one letter per column, ``l`` (default), ``r`` or ``c``.
    """
    align = align.ljust(len(columns), "l")
    lines = [md_row(columns), "|" + "|".join(_ALIGN[a] for a in align) + "|"]
    return lines + [md_row(row) for row in rows]


def md_row(cells: Sequence[Any]) -> str:
    """``| a | b |``."""
    return "| " + " | ".join(str(c) for c in cells) + " |"


def md_cell(text: Any) -> str:
    """Text safe inside a Markdown table cell (no ``|``, no line break)."""
    return str(text).replace("|", "\\|").replace("\n", " ")


# --------------------------------------------------------------------------------------------
# Subprocess workers
# --------------------------------------------------------------------------------------------


def script_command(script: str | Path, *args: str) -> list[str]:
    """``[python, script, *args]``: a benchmark script again, in a fresh interpreter."""
    return [sys.executable, str(Path(script).resolve()), *args]
