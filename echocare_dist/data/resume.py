"""How a saved loader state continues: exactly, re-split over another world size, or not at all.

A loader state (`PretrainLoader.state_dict()`, one per rank; the checkpoint holds the list) records
the epoch, the batches returned in it, the settings the epoch's sample order depends on, and the
positions of the epoch's list (listing.py) this rank has consumed. `decide(states, ...)` turns the
list a checkpoint holds into one of three answers:

- "exact": same world size, loader kind, data.seed, train.micro_batch, reader settings, and no
  shard damaged since the save. The rank continues from its own state; the same batches come out
  bit for bit as without the interruption (DALI's checkpoint / the fallback's skip).
- "split": anything else, as long as every rank's state is there and the epoch's list is the same
  (data.seed and the mixture unchanged). The union of the consumed positions is taken out of the
  epoch and the rest is split over the ranks of this run in contiguous, equal ranges with equal
  step counts: no sample of the epoch is read twice, none is skipped (the end-of-epoch remainder
  below world_size x micro_batch is left out, as in every epoch). Shards damaged since the save
  are left out of the rest. A saved epoch that had run all its steps continues with the next one.
- "restart": the saved position cannot be mapped (states of a release without positions, a
  changed data.seed or mixture, a missing rank): the saved epoch starts over with a warning.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from .contracts import RENAMED_KINDS, Reader
from .listing import positions_from_ranges, ranges_from_positions
from .shards import DataLoaderError, EpochPlan, ShardSet

STATE_VERSION = 1
EXACT, SPLIT, RESTART = "exact", "split", "restart"


def check_version(state) -> None:
    if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
        got = state.get("version") if isinstance(state, dict) else state
        raise DataLoaderError(f"unsupported loader state (version {got!r}); expected version {STATE_VERSION}")


@dataclass(frozen=True)
class ResumeDecision:
    mode: str                       # EXACT | SPLIT | RESTART
    epoch: int
    position: int = 0               # batches of `plan` already returned (EXACT), else 0
    plan: EpochPlan | None = None   # the epoch to continue (EXACT / SPLIT)
    consumed: np.ndarray | None = None   # bool per position of the epoch's list, consumed so far
    reader_state: dict | None = None     # EXACT: the reader's own saved state
    why: str | None = None          # why not EXACT (SPLIT / RESTART), for the log


def resume_mismatch(state: dict, *, kind: str, world_size: int, seed: int, micro_batch: int, reader: Reader,
                    shard_set: ShardSet, plan_for: Callable[[set[str]], EpochPlan], mixture_tag=None
                    ) -> tuple[str | None, EpochPlan | None]:
    """(why `state` cannot continue exactly, None) or (None, the saved epoch's plan).

    `plan_for(excluded)` builds the saved epoch's plan with those shards left out."""
    saved_kind = RENAMED_KINDS.get(state["loader"], state["loader"])
    if state["world_size"] != world_size:
        return f"world size changed from {state['world_size']} to {world_size}", None
    if saved_kind != kind:
        return f"the state was saved by the {state['loader']!r} loader, this is {kind!r}", None
    if state["seed"] != seed or state["micro_batch"] != micro_batch:
        return "data.seed or train.micro_batch changed", None
    if state.get("mixture") != mixture_tag:
        return "data.source_weights / data.source_alpha changed", None
    if not reader.compatible(state.get("reader")):
        return "the reader settings changed (data.num_threads)", None
    damaged = damaged_since(state, shard_set)
    if damaged:
        return f"shard(s) {sorted(damaged)} were damaged since the save", None
    plan = plan_for(set(state["excluded"]))
    if plan.steps != state["steps_per_epoch"]:
        return f"the epoch now has {plan.steps} steps, the saved one had {state['steps_per_epoch']}", None
    return None, plan


def damaged_since(state: dict, shard_set: ShardSet) -> dict[str, str]:
    excluded = set(state["excluded"])
    return shard_set.preflight(s for s in shard_set.shards if s.name not in excluded)


def consumed_positions(state: dict, length: int, where: str) -> np.ndarray:
    """Bool (length,): the positions `state` says were consumed (before its split and by its rank)."""
    out = np.zeros(length, bool)
    for key in ("consumed_before", "consumed"):
        try:
            p = positions_from_ranges(state.get(key), f"{where} {key!r}")
        except ValueError as exc:
            raise DataLoaderError(str(exc)) from None
        if len(p) and int(p.max()) >= length:
            raise DataLoaderError(f"{where}: position {int(p.max())} is beyond the epoch's {length} samples")
        out[p] = True
    return out


def split_mismatch(states: Sequence[dict], *, seed: int, mixture_tag) -> str | None:
    """Why the states cannot be re-split exactly (None: they can)."""
    first = states[0]
    saved_world = int(first["world_size"])
    if len(states) != saved_world:
        return f"{len(states)} loader state(s) for the {saved_world} rank(s) that saved them"
    if any("consumed" not in s for s in states):
        return "the states carry no consumed positions (saved by an older release)"
    if len({(int(s["epoch"]), int(s["position"])) for s in states}) != 1:
        return "the ranks' states are at different epochs or steps"
    if first["seed"] != seed:
        return "data.seed changed"
    if any(s.get("mixture") != mixture_tag for s in states):
        return "data.source_weights / data.source_alpha changed"
    return None


def decide(states: Sequence[dict], *, rank: int, world_size: int, kind: str, seed: int, micro_batch: int,
           reader: Reader, shard_set: ShardSet, mixture_tag, plan_for: Callable[[int, set[str]], EpochPlan],
           split_for: Callable[..., EpochPlan]) -> ResumeDecision:
    """The resume of this rank (`rank` of `world_size`) from a checkpoint's loader `states`.

    `plan_for(epoch, excluded)` is the fresh plan of an epoch on this world size; `split_for(epoch=,
    excluded=, order_world=, consumed=, consumed_ranges=, left_out=)` the plan of its unconsumed rest."""
    if not states:
        raise DataLoaderError("no loader state to resume from")
    for s in states:
        check_version(s)
    epoch = int(states[0]["epoch"])
    own = states[rank] if len(states) == world_size else (states[0] if len(states) == 1 else None)
    why = f"world size changed from {states[0]['world_size']} to {world_size}" if own is None else None
    if own is not None:
        why, plan = resume_mismatch(own, kind=kind, world_size=world_size, seed=seed, micro_batch=micro_batch,
                                    reader=reader, shard_set=shard_set, mixture_tag=mixture_tag,
                                    plan_for=lambda ex: _saved_plan(own, ex, plan_for, split_for))
        if why is None:
            consumed = consumed_positions(own, len(plan.listing), f"rank {rank}'s loader state") \
                if "consumed" in own else None
            return ResumeDecision(EXACT, epoch, int(own["position"]), plan, consumed, own.get("reader"))
    split_why = split_mismatch(states, seed=seed, mixture_tag=mixture_tag)
    if split_why is not None:
        return ResumeDecision(RESTART, epoch, why=f"{why}; cannot re-split the epoch: {split_why}")
    first = states[0]
    if int(first["position"]) >= int(first["steps_per_epoch"]):
        # The saved epoch ran all its steps; only its end-of-epoch remainder was left.
        return ResumeDecision(SPLIT, epoch + 1, plan=plan_for(epoch + 1, None), why=why)
    left_out = set(first.get("left_out", ()))
    excluded = set(first["excluded"]) - left_out     # what the epoch's list was drawn without
    saved = split_for(epoch=epoch, excluded=excluded, order_world=int(first.get("order_world", first["world_size"])),
                      consumed=None, consumed_ranges=(), left_out=())
    consumed = np.zeros(len(saved.listing), bool)
    for r, s in enumerate(states):
        consumed |= consumed_positions(s, len(consumed), f"rank {r}'s loader state")
    plan = split_for(epoch=epoch, excluded=excluded, order_world=saved.order_world, consumed=consumed,
                     consumed_ranges=tuple(ranges_from_positions(np.flatnonzero(consumed))),
                     left_out=left_out | set(damaged_since(first, shard_set)))
    return ResumeDecision(SPLIT, epoch, plan=plan, consumed=consumed, why=why)


def _saved_plan(state: dict, excluded: set[str], plan_for, split_for) -> EpochPlan:
    """The plan `state` was saved in: the fresh epoch, or the split rest it was already in."""
    epoch = int(state["epoch"])
    before = state.get("consumed_before") or ()
    left_out = set(state.get("left_out") or ())
    order_world = int(state.get("order_world", state["world_size"]))
    if not before and not left_out and order_world == int(state["world_size"]):
        return plan_for(epoch, excluded)
    consumed = None
    if before:
        probe = split_for(epoch=epoch, excluded=excluded - left_out, order_world=order_world, consumed=None,
                          consumed_ranges=(), left_out=())
        consumed = np.zeros(len(probe.listing), bool)
        consumed[positions_from_ranges(before, "loader state 'consumed_before'")] = True
    return split_for(epoch=epoch, excluded=excluded - left_out, order_world=order_world, consumed=consumed,
                     consumed_ranges=tuple(map(tuple, before)), left_out=left_out)
