"""How the aggregator's rounds open, close and restart, on one shard or on every shard.

The round engine decides; these functions do what it decides on, for ``Aggregator`` and
under its locks: wait for the start quorum (or the other shards), publish a round, add
each counted upload in a worker thread, and close the round at its quorum or deadline
(step, evaluate, checkpoint, publish the next). Sharded, shard 0 coordinates: it counts
an upload only once every shard holds its part (``count_everywhere``), closes every
shard's round with exactly the uploads it counted, and restarts the open round on every
shard when one fails (``recover``, ``redo``). They are the aggregator's own methods,
kept apart to keep it small: they read and write its state, private attributes included.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from typing import TYPE_CHECKING

import torch

from fedgrad.errors import RpcError, StaleRound, Unavailable
from fedgrad.server.broadcast import make_snapshot
from fedgrad.server.engine import Deadline
from fedgrad.server.staging import StagedUpload, UploadTicket
from fedgrad.task import trainable_parameters

if TYPE_CHECKING:
    from .aggregator import Aggregator

__all__ = [
    "add_upload",
    "begin",
    "close_round",
    "count_everywhere",
    "open_first",
    "publish",
    "recover",
    "redo",
    "sync_then_open",
]

# The aggregator's logger: its records and their wording stay as they were.
log = logging.getLogger("fedgrad.aggregator")


async def _give_up(agg: Aggregator, why: str) -> None:
    """The shards cannot train: say why, and wake every waiter (they answer ``failed``)."""
    agg.failed = why
    log.error(why, extra={"event": "shards"})
    async with agg._changed:
        agg._changed.notify_all()


async def sync_then_open(agg: Aggregator) -> None:
    assert agg.peers is not None
    patience = agg.cfg.start_timeout or agg.cfg.round_timeout
    try:
        await agg.peers.wait_synced(agg.engine.round, agg.session_id, patience)
    except RpcError as exc:
        await _give_up(agg, f"the shards cannot form a federation: {exc}")
        return
    agg._peers_ready.set()
    await open_first(agg)


async def open_first(agg: Aggregator) -> None:
    if agg.resumed:
        await publish(agg)
    else:
        wait = agg.cfg.start_timeout or agg.cfg.round_timeout
        agg._timer = agg._spawn(_start_deadline(agg, wait))


async def _evaluate_shards(agg: Aggregator, round_: int) -> dict[str, float]:
    """Evaluate the whole model of ``round_``: this shard's pieces and the others'.

    Shard 0 keeps one copy of the whole model for this, filled each round from every
    shard's published pieces (the task's test set is evaluated as unsharded).
    """
    assert agg.shards is not None and agg.peers is not None
    if agg._eval_module is None:
        agg._eval_module = agg.shards.task.inner.model()
    params = [p for _, p in trainable_parameters(agg._eval_module)]
    await agg.peers.gather(agg, into=params, round_=round_)
    agg.gathered_round = round_
    module, task = agg._eval_module, agg.shards.task.inner

    def evaluate() -> dict[str, float]:
        with torch.no_grad():
            module.eval()
            return task.evaluate(module) or {}

    return await asyncio.to_thread(evaluate)


async def _start_deadline(agg: Aggregator, wait: float) -> None:
    await asyncio.sleep(wait)
    if agg.engine.start_deadline():
        await begin(agg)
    elif agg.engine.phase.value == "waiting":
        log.warning(
            "start deadline passed with %d of %d nodes; starting once %d have joined",
            agg.engine.active_count,
            agg.cfg.nodes,
            agg.cfg.min_nodes,
            extra={"event": "below_quorum"},
        )


async def begin(agg: Aggregator) -> None:
    await agg._peers_ready.wait()
    async with agg._closing:
        await asyncio.to_thread(agg.checkpoint)
        await publish(agg)


async def count_everywhere(agg: Aggregator, ticket: UploadTicket) -> int:
    """``Aggregator.count_everywhere``: ``count``, on every shard (see there)."""
    if agg.peers is None or ticket.staged is None:
        return agg.count(ticket)
    ticket.staged.complete()
    epoch = agg.redo_epoch
    try:
        why = await agg.peers.hold(
            ticket.node_id, ticket.round, ticket.upload_id, agg.cfg.idle_timeout,
            ticket.presummed,
        )  # fmt: skip
    except RpcError as exc:
        recover(agg, str(exc))
        raise Unavailable(f"not counted on any shard: {exc}") from None
    if agg.redo_epoch != epoch:
        raise StaleRound(f"round {agg.round} restarted on every shard during the upload", agg.round)
    if why:
        raise Unavailable(f"not counted on any shard: {why}; push every shard its part again")
    counted = agg.count(ticket)
    if ticket.counted:
        try:
            await agg.peers.commit(
                ticket.node_id, ticket.round, ticket.upload_id, ticket.weight, ticket.presummed
            )
        except RpcError as exc:
            recover(agg, str(exc))  # counted here, not there: the round restarts
            raise Unavailable(f"not counted on every shard: {exc}") from None
    return counted


async def add_upload(
    agg: Aggregator, ticket: UploadTicket, staged: StagedUpload, staleness: int
) -> None:
    scale = agg.policy.scale(staleness)
    try:
        async with agg._adding:
            agg.intake.free_slot(ticket)  # the add lets the chunks go as it goes
            began = time.perf_counter()
            add = agg.reducer.add
            if ticket.presummed:  # a relay's partial sum: checked in Intake.open
                add = functools.partial(agg.reducer.add, presummed=True)  # type: ignore[call-arg]
            norm = await asyncio.to_thread(add, staged, ticket.weight, scale, ticket.node_id)
            if ticket.buffers is not None:
                agg.model.buffer_mean.add(ticket.buffers, ticket.weight)
            agg.counters.add_seconds += time.perf_counter() - began
            agg.ledger.applied(ticket.node_id, ticket.round, ticket.weight, staleness, norm)
    except Exception:
        # Cannot happen for a validated upload (weights and length are checked before
        # counting); if it does, say so loudly rather than close a round without it.
        log.exception(
            "add failed; the round will not close",
            extra={"node": ticket.node_id, "round": ticket.round, "event": "add_failed"},
        )
        raise
    finally:
        agg.intake.release(ticket, added=True)
    if agg.engine.added():
        await close_round(agg)


def recover(agg: Aggregator, reason: str) -> None:
    """Restart the open round on every shard once the failed shard answers again."""
    epoch = agg.redo_epoch

    async def restart() -> None:
        async with agg._closing:
            if agg.redo_epoch == epoch and not agg.finished:
                await redo(agg, reason)

    if not agg._recovering:
        agg._recovering = True
        task = agg._spawn(restart())
        task.add_done_callback(lambda _: setattr(agg, "_recovering", False))


async def redo(agg: Aggregator, reason: str) -> None:
    """Every shard forgets the open round and it opens again (hold ``agg._closing``).

    Waits, with the status saying why, until every shard answers; a shard that
    restarted resumes from its checkpoint of this round (one a round ahead goes back).
    """
    assert agg.peers is not None
    log.warning(
        "round %d restarts on every shard: %s", agg.round, reason,
        extra={"round": agg.round, "event": "redo"},
    )  # fmt: skip
    while agg.engine.pending_adds:
        await asyncio.sleep(0.01)
    while True:
        try:
            await agg.peers.wait_synced(agg.round, agg.session_id, agg.cfg.round_timeout)
            break
        except Unavailable as exc:
            log.warning("rounds wait: %s", exc, extra={"event": "shards"})
        except RpcError as exc:
            await _give_up(agg, f"the shards cannot go on: {exc}")
            return
    agg.reducer.reset()
    agg.engine.redo()
    agg.redo_epoch += 1
    await publish(agg)


async def _round_deadline(agg: Aggregator, round_: int) -> None:
    await asyncio.sleep(agg.cfg.round_timeout)
    decision = agg.engine.round_deadline(round_)
    if decision is Deadline.CLOSE:
        await close_round(agg)
    elif decision is Deadline.BELOW_QUORUM:
        agg._replace_missing(missed_deadline=True)
        async with agg._changed:
            agg._changed.notify_all()
        log.warning(
            "round deadline passed with %d of %d required uploads; waiting for nodes",
            agg.engine.counted(),
            agg.cfg.min_nodes,
            extra={"round": round_, "event": "below_quorum"},
        )


async def close_round(agg: Aggregator) -> None:
    # begin_close before any await: uploads finishing from now on are ABORTED.
    for node in agg.engine.begin_close():
        log.warning(
            "node missed the round deadline",
            extra={"node": node, "round": agg.round, "event": "dropped"},
        )
    epoch = agg.redo_epoch
    async with agg._closing:
        if agg.redo_epoch != epoch:
            return  # the round restarted on every shard while this close waited
        c = agg.counters
        collected = time.perf_counter()
        phases = {"collect": time.monotonic() - c.round_started, "reduce": c.add_seconds}
        prepare = getattr(agg.reducer, "prepare", None)
        if prepare is not None:
            prepare(agg.round)  # seeded DP test noise is keyed to the round
        await _retire(agg)
        if agg.peers is not None:
            # Every shard steps exactly the uploads counted here; the others first, so
            # that a failure leaves this shard's round as it was, and it restarts.
            finished = agg.round + 1 >= agg.engine.total_rounds
            try:
                await agg.peers.close(
                    agg.round, agg.engine.reported, finished, agg.cfg.round_timeout
                )
            except RpcError as exc:
                await redo(agg, str(exc))
                return
        metrics = await asyncio.to_thread(agg.model.step, agg.reducer)
        if agg.shards is not None and agg.shards.task.evaluates:
            metrics = await _evaluate_shards(agg, agg.round + 1)
        phases["step"] = time.perf_counter() - collected
        selected = agg.engine.selected
        record = agg.ledger.close(
            agg.round,
            c,
            metrics,
            selected,
            agg._selected_count(selected),
            getattr(agg.reducer, "stats", {}),
        )
        if agg.engine.opening_round < agg.engine.total_rounds and agg.ledger.budget_spent(record):
            agg.engine.end_early()
        agg.reducer.reset()
        began = time.perf_counter()
        await asyncio.to_thread(agg.checkpoint, agg.round + 1)
        phases["checkpoint"] = time.perf_counter() - began
        began = time.perf_counter()
        await publish(agg)
        phases["broadcast"] = time.perf_counter() - began
        c.phase_seconds = phases
    for callback in agg.on_round:
        callback(record)


async def _retire(agg: Aggregator) -> None:
    """Before the step writes the parameters: streams still reading them get a copy.

    New pulls wait for the next round's snapshot (their upload of this round would be
    stale anyway); the streams already reading finish from a frozen copy, made only
    if there are any (``fedgrad.server.broadcast``).
    """
    snapshot, agg.snapshot = agg.snapshot, None
    if snapshot is not None:
        await asyncio.to_thread(snapshot.freeze)


async def publish(agg: Aggregator) -> None:
    """Serialize the parameters of the round about to open, then open it."""
    round_ = agg.engine.opening_round
    finished = round_ >= agg.engine.total_rounds
    agg.snapshot = None  # let the old broadcast go before the new one is built
    snapshot = await asyncio.to_thread(
        make_snapshot,
        agg.model.params,
        agg.layout,
        agg.cfg.chunk_bytes,
        round_,
        finished,
        agg.session_id,
        agg.cfg.broadcast_dtype,
        agg.engine.total_rounds,
        agg.model.round_config(round_, agg.engine.total_rounds),
        agg.model.buffer_bytes(),
    )
    async with agg._changed:
        agg.snapshot = snapshot
        agg.engine.opened()
        agg.counters.new_round()
        agg._changed.notify_all()
    if agg._timer is not None and agg._timer is not asyncio.current_task():
        agg._timer.cancel()
    if not finished:
        agg._timer = agg._spawn(_round_deadline(agg, round_))
