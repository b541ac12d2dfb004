"""The node's side of a lossy codec: error feedback, codec memory, and their file.

Error feedback (Seide et al. 2014; Lin et al. 2018; Vogels et al. 2019): the node
adds what it has not sent yet (the *residual*) to each round's update before
encoding, and keeps as the new residual the difference between that sum and what
the aggregator will decode from the payload (``fedgrad.codecs.decode_dense``: the
aggregator's own decoder, so both sides agree to the last bit). Over rounds the
node sends exactly its total update: sent values plus the final residual equal the
sum of the raw updates. PowerSGD also keeps each matrix's last Q factor (its warm
start) as codec memory.

A round can be computed twice (a lost reply, an aggregator that restarted), so the
state is kept per round pushed: round r starts from the newest state recorded for a
round before r, and recomputing r gives the same payload as the first time. The two
newest states are kept. With ``--state-dir`` each state is also written to
``DIR/NODE.feedback-rROUND.npz`` (numpy arrays and a JSON header, read back without
pickle) before its upload goes out, so a restarted node resumes them; without it a
restart starts from a zero residual and fresh factors.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import numpy as np
import torch

from fedgrad.codec import TensorSpec
from fedgrad.codecs import Codec

__all__ = ["ErrorFeedback"]

log = logging.getLogger("fedgrad.node")
_KEEP = 2
_FORMAT = "fedgrad-feedback-1"


@dataclass
class _State:
    """What round ``round`` left for the next: the residual and the codec's memory."""

    round: int
    residual: list[torch.Tensor] | None
    memory: dict[int, torch.Tensor]


class ErrorFeedback:
    """Encode each round's update with ``codec``, carrying residual and memory across rounds.

    Args:
        codec: the node's codec for its manifest.
        enabled: keep a residual (``--error-feedback``); codec memory is kept regardless.
        state_dir: where states survive a restart (None: in memory only).
        node_id: names the files.
    """

    def __init__(
        self, codec: Codec, enabled: bool, state_dir: str | None = None, node_id: str = "node"
    ) -> None:
        self.codec, self.enabled = codec, enabled
        self.stateful = enabled or hasattr(codec, "memory")
        self.dir = Path(state_dir) if state_dir and self.stateful else None
        self.node_id = node_id
        self.states: list[_State] = []
        if self.dir is not None:
            self.dir.mkdir(parents=True, exist_ok=True)
            self.states = self._load()

    def encode(
        self, round_: int, update: list[torch.Tensor], generator: torch.Generator | None
    ) -> list[np.ndarray]:
        """Return the payload views of round ``round_``'s update, and record its state."""
        if not self.stateful:
            return self.codec.encode(update, generator)
        before = self._before(round_)
        if hasattr(self.codec, "memory"):
            self.codec.memory = dict(before.memory) if before else {}
        work = update
        if self.enabled and before is not None and before.residual is not None:
            work = [u.detach().cpu() + r for u, r in zip(update, before.residual, strict=True)]
        views = self.codec.encode(work, generator)
        residual = self._left(work, views) if self.enabled else None
        memory = dict(getattr(self.codec, "memory", {}))
        self._record(_State(round_, residual, memory))
        return views

    def _left(self, work: list[torch.Tensor], views: list[np.ndarray]) -> list[torch.Tensor]:
        """Return ``work`` minus what the aggregator decodes from ``views``, per tensor.

        The residual is kept in float32 (float64 for a float64 model) whatever the
        model's dtype, so a half-precision model does not round away what is left.
        """
        wide = torch.float64 if any(w.dtype == torch.float64 for w in work) else torch.float32
        flat = torch.cat([w.detach().cpu().reshape(-1).to(wide) for w in work])
        left = flat.numpy()
        layout = self.codec.layout
        # A view reads like the message bytes it would travel in (np.frombuffer takes both).
        chunks = [
            (layout.starts[i], cast(bytes, v), 0, v.size) for i, v in enumerate(views) if v.size
        ]
        for where, values in self.codec.decode(chunks):  # the aggregator's own decoder
            if self.codec.sparse:
                left[where] -= values
            else:
                left[where : where + values.size] -= values
        return [
            part.view(w.shape)
            for part, w in zip(flat.split([w.numel() for w in work]), work, strict=True)
        ]

    @property
    def residual(self) -> list[torch.Tensor] | None:
        """The newest residual (what has not been sent yet), or None."""
        return self.states[-1].residual if self.states else None

    def _before(self, round_: int) -> _State | None:
        earlier = [s for s in self.states if s.round < round_]
        if earlier:
            return earlier[-1]
        if self.states:  # resumed further back than the states kept: the oldest one
            log.warning(
                "round %d is older than the error-feedback states kept (rounds %s);"
                " continuing from the oldest",
                round_,
                [s.round for s in self.states],
                extra={"node": self.node_id, "round": round_, "event": "feedback"},
            )
            return self.states[0]
        return None

    def _record(self, state: _State) -> None:
        self.states = [s for s in self.states if s.round < state.round][-(_KEEP - 1) :]
        self.states.append(state)
        if self.dir is not None:
            self._save(state)
            keep = {s.round for s in self.states}
            for path, round_ in self._files():
                if round_ not in keep:
                    path.unlink(missing_ok=True)

    # -- the files ------------------------------------------------------------------------
    def _files(self) -> list[tuple[Path, int]]:
        assert self.dir is not None
        pattern = re.compile(re.escape(self.node_id) + r"\.feedback-r(\d+)\.npz")
        found = []
        for path in self.dir.iterdir():
            match = pattern.fullmatch(path.name)
            if match:
                found.append((path, int(match.group(1))))
        return sorted(found, key=lambda f: f[1])

    def _header(self, state: _State) -> dict[str, object]:
        return {
            "format": _FORMAT,
            "node": self.node_id,
            "codec": self.codec.name,
            "manifest": [[s.name, str(s.dtype), list(s.shape)] for s in self.codec.layout.specs],
            "round": state.round,
            "residual": state.residual is not None,
            "memory": sorted(state.memory),
        }

    def _save(self, state: _State) -> None:
        assert self.dir is not None
        arrays: dict[str, np.ndarray] = {
            "header": np.frombuffer(json.dumps(self._header(state)).encode(), np.uint8)
        }
        for i, r in enumerate(state.residual or []):
            arrays[f"residual_{i}"] = _numpy(r)
        for i, q in state.memory.items():
            arrays[f"memory_{i}"] = _numpy(q)
        final = self.dir / f"{self.node_id}.feedback-r{state.round}.npz"
        partial = final.with_name(final.name + ".partial")
        with open(partial, "wb") as fh:
            np.savez(fh, **arrays)  # type: ignore[arg-type]
        os.replace(partial, final)

    def _load(self) -> list[_State]:
        states = []
        for path, round_ in self._files()[-_KEEP:]:
            try:
                states.append(self._read(path, round_))
            except (OSError, ValueError, KeyError) as e:
                log.warning(
                    "ignoring the error-feedback state %s: %s",
                    path,
                    e,
                    extra={"node": self.node_id, "event": "feedback"},
                )
        if states:
            log.info(
                "resumed the error-feedback state of round(s) %s from %s",
                [s.round for s in states],
                self.dir,
                extra={"node": self.node_id, "event": "feedback"},
            )
        return states

    def _read(self, path: Path, round_: int) -> _State:
        specs = self.codec.layout.specs
        with np.load(path, allow_pickle=False) as saved:
            header = json.loads(bytes(saved["header"]).decode())
            want = self._header(_State(round_, None, {}))
            for key in ("format", "node", "codec", "manifest"):
                if header.get(key) != want[key]:
                    raise ValueError(
                        f"it was written for {key} {header.get(key)!r}, this node has {want[key]!r}"
                    )
            residual = None
            if header["residual"]:
                residual = [_tensor(saved[f"residual_{i}"], s) for i, s in enumerate(specs)]
            memory = {
                int(i): torch.from_numpy(saved[f"memory_{i}"].copy()) for i in header["memory"]
            }
        return _State(round_, residual, memory)


def _numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().contiguous().numpy()  # residuals and factors: float32/64


def _tensor(array: np.ndarray, spec: TensorSpec) -> torch.Tensor:
    t = torch.from_numpy(array.copy())
    if tuple(t.shape) != spec.shape or t.dtype not in (torch.float32, torch.float64):
        raise ValueError(
            f"residual {spec.name!r} is {t.dtype} {list(t.shape)}, expected float32 or float64"
            f" {list(spec.shape)}"
        )
    return t
