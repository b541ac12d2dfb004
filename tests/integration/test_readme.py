"""The README's command blocks, run as written, so that the README cannot drift.

A fenced block right after the line ``<!-- runnable -->`` runs with bash (```` ```sh ````,
``-e -o pipefail``: any failing command fails it) or python (```` ```python ````), the
way a user types it in the repository root after ``make run`` and
``. .venv/bin/activate``: this venv's ``bin`` first on PATH, no ``FEDGRAD_*``
variables, no ``PYTHONPATH``, in a scratch directory that holds a copy of
``examples/``. The blocks of one README section run in order in one scratch
directory; sections are independent.

``<!-- runnable: background -->`` marks a service that runs until it is done or
stopped: the test starts it, waits until its ``--listen`` port accepts connections,
runs the blocks after it in its section, then stops it with SIGTERM if it has not
exited by itself. Either way it must exit 0.

Only what must differ on a test machine differs from the text: the ports 50051 and
9090 become free ports, so that the test runs beside anything else on the machine,
and ``--rounds N`` becomes ``--rounds 2`` (``ROUNDS``), so that it runs in seconds.
Blocks that need other machines (host names that resolve nowhere here) and the
``make`` block stay unmarked; ``test_every_shell_block_runs_or_says_why_not`` keeps
it that way.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from fedgrad.history import read_history

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
#: Bound on one block or one service start; generous, since no timing is asserted.
BLOCK_TIMEOUT = 120.0
#: How long a finished section's service may take to exit by itself before SIGTERM.
EXIT_GRACE = 10.0
_MARK = re.compile(r"<!-- runnable(?:: (background))? -->")
_FENCE = re.compile(r"```(\w*)\s*$")
_SHELLS = {"sh", "bash", "shell", "console"}
#: Ports in the README's commands; the test gives each a free port instead.
PORTS = ("50051", "9090")
#: Rounds of every ``--rounds`` in the README's commands, here.
ROUNDS = 2


@dataclass(frozen=True)
class Block:
    """A fenced block of the README.

    Attributes:
        section: the ``## `` heading it sits under ("" before the first).
        lang: the fence's language (``sh``, ``python``, ...).
        mark: "run", "background", or "" for an unmarked block.
        text: the block's lines.
        line: its first line's number in README.md (1-based).
    """

    section: str
    lang: str
    mark: str
    text: str
    line: int


def readme_blocks(text: str) -> list[Block]:
    """Return every fenced block of ``text`` with its section and its mark."""
    blocks: list[Block] = []
    lines = text.splitlines()
    section, mark, i = "", "", 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("## "):
            section = line[3:].strip()
        fence = _FENCE.match(line)
        if fence:
            end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
            body = "\n".join(lines[i + 1 : end]) + "\n"
            blocks.append(Block(section, fence.group(1), mark, body, i + 2))
            i, mark = end + 1, ""
            continue
        found = _MARK.fullmatch(line.strip())
        mark = ("background" if found.group(1) else "run") if found else ""
        i += 1
    return blocks


BLOCKS = readme_blocks(README.read_text())
SECTIONS = list(dict.fromkeys(b.section for b in BLOCKS if b.mark))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _environment() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEDGRAD_")}
    env.pop("PYTHONPATH", None)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _argv(block: Block) -> list[str]:
    if block.lang == "python":
        return [sys.executable, "-c", block.text]
    assert block.lang in _SHELLS, f"README.md:{block.line}: cannot run a {block.lang!r} block"
    return ["bash", "-e", "-o", "pipefail", "-c", block.text]


def _run(block: Block, cwd: Path, env: dict[str, str]) -> tuple[int, str]:
    """Run a block to its end; return its exit code and output (its processes die with it)."""
    proc = subprocess.Popen(
        _argv(block), cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, start_new_session=True,
    )  # fmt: skip
    try:
        output, _ = proc.communicate(timeout=BLOCK_TIMEOUT)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # whatever it left running in the background
        except ProcessLookupError:
            pass
        proc.wait()
    return proc.returncode, output


def _wait_listening(text: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    """Wait until the ``--listen`` port of ``text`` accepts connections (or fail)."""
    listen = re.search(r"--listen\s+\S*:(\d+)", text)
    assert listen, f"a background block must say --listen HOST:PORT:\n{text}"
    deadline = time.monotonic() + BLOCK_TIMEOUT
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"exited {proc.returncode}:\n{log.read_text()}"
        try:
            socket.create_connection(("127.0.0.1", int(listen.group(1))), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise AssertionError(f"nothing listens after {BLOCK_TIMEOUT} s:\n{log.read_text()}")


def _stop(proc: subprocess.Popen[bytes], log: Path) -> None:
    try:
        proc.wait(timeout=EXIT_GRACE)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)  # a service: graceful, exit 0
        proc.wait(timeout=BLOCK_TIMEOUT)
    assert proc.returncode == 0, f"exited {proc.returncode}:\n{log.read_text()}"


@pytest.fixture
def scratch(tmp_path: Path) -> Iterator[Path]:
    """A scratch directory like the repository root: a copy of examples/ (no caches)."""
    shutil.copytree(
        REPO / "examples", tmp_path / "examples", ignore=shutil.ignore_patterns("__pycache__")
    )
    yield tmp_path


def _run_section(section: str, cwd: Path) -> None:
    """Run the marked blocks of ``section`` in order in ``cwd``, as the module docstring says."""
    ports = {port: str(_free_port()) for port in PORTS}
    env = _environment()
    services: list[tuple[subprocess.Popen[bytes], Path]] = []
    try:
        for n, block in enumerate(b for b in BLOCKS if b.section == section and b.mark):
            text = re.sub(r"\b(50051|9090)\b", lambda m: ports[m.group(1)], block.text)
            text = re.sub(r"--rounds \d+", f"--rounds {ROUNDS}", text)
            block = Block(block.section, block.lang, block.mark, text, block.line)
            where = f"README.md:{block.line} ({section})"
            if block.mark == "background":
                log = cwd / f".service-{n}.log"
                with open(log, "wb") as out:
                    proc = subprocess.Popen(
                        _argv(block), cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )  # fmt: skip
                services.append((proc, log))
                _wait_listening(text, proc, log)
                continue
            code, output = _run(block, cwd, env)
            assert code == 0, f"{where} exited {code}:\n{text}\n{output}"
        for proc, log in services:
            _stop(proc, log)
    finally:
        for proc, _ in services:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def _trained_and_saved(cwd: Path) -> None:
    assert len(read_history(cwd / "history.csv")) == ROUNDS
    assert (cwd / "model.safetensors").is_file()


#: What a section's text promises beyond exit codes, checked after it ran.
CLAIMS: dict[str, Callable[[Path], None]] = {"Run it as services": _trained_and_saved}


@pytest.mark.slow
@pytest.mark.parametrize("section", SECTIONS)
def test_readme_section_runs_as_written(section: str, scratch: Path) -> None:
    _run_section(section, scratch)
    if section in CLAIMS:
        CLAIMS[section](scratch)


def test_the_sections_that_promise_runnable_commands_have_them() -> None:
    assert {"Run it as services", "Operate"} <= set(SECTIONS)
    assert any(s.startswith("Your own task") for s in SECTIONS)
    assert set(CLAIMS) <= set(SECTIONS)
    for block in BLOCKS:
        if block.mark == "background":
            assert "--listen" in block.text, f"README.md:{block.line}"


def test_every_shell_block_runs_or_says_why_not() -> None:
    """An unmarked shell block needs make, other machines, or ``...`` placeholders."""
    unmarked = [b for b in BLOCKS if b.lang in _SHELLS and not b.mark]
    for block in unmarked:
        why_not = (
            re.search(r"^make (run|test)\b", block.text, re.M)
            or ".example" in block.text
            or " ... " in block.text
        )
        assert why_not, (
            f"README.md:{block.line}: mark this block <!-- runnable --> (the test runs it) or"
            f" make it say why it cannot run here:\n{block.text}"
        )


def test_readme_says_how_to_get_the_commands_on_path() -> None:
    text = README.read_text()
    top = text[: text.index("\n## ")]
    assert ". .venv/bin/activate" in top and ".venv/bin/fedgrad" in top
