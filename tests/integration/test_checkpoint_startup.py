"""``fedgrad aggregator`` refuses an unusable ``--checkpoint-dir`` at start-up.

Exit code 2 and one line on stderr (the CLI's ``ConfigError`` path), before it
serves or waits for nodes; never a traceback, never a server whose every Join
fails with UNKNOWN. What ``load_checkpoint`` checks: ``tests/unit/test_checkpoint.py``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from faults_support import PROC_TIMEOUT

from fedgrad.server.checkpoint import CHECKPOINT_FILE


@pytest.mark.parametrize(
    ("case", "says"),
    [
        ("a-file", "exists and is not a directory"),
        ("json-list", "is corrupt: it holds [1, 2], not a JSON object"),
    ],
)
def test_aggregator_refuses_a_bad_checkpoint_dir_at_start_up(
    spawn, cli, tmp_path: Path, case: str, says: str
) -> None:
    target = tmp_path / "ckpt"
    if case == "a-file":
        target.write_text("not a folder\n")
    else:
        target.mkdir()
        (target / CHECKPOINT_FILE).write_text("[1, 2]")
    proc = spawn(*cli.argv, "aggregator", "--task", "linear", "--checkpoint-dir", target,
                 "--rounds", "1", "--nodes", "1", "--listen", "127.0.0.1:0",
                 "--no-progress")  # fmt: skip
    _, err = proc.communicate(timeout=PROC_TIMEOUT)  # it never waits for the node
    assert proc.returncode == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("fedgrad aggregator: error: ") and says in lines[0], err
    assert "--checkpoint-dir" in lines[0], "the line should say what to do"
