"""Whether a saved loader state continues exactly where it stopped.

A loader state (`PretrainLoader.state_dict()`) records everything the epoch's sample order depends
on: world size, loader kind, data.seed, train.micro_batch, the reader's own settings, and the
shards the epoch left out. When one of them differs, or a shard of the saved epoch is damaged
since the save, the saved position means nothing any more: the loader then restarts the saved
epoch from its first step (and says why) instead of silently giving other samples.
"""
from __future__ import annotations

from typing import Callable

from .contracts import RENAMED_KINDS, Reader
from .shards import DataLoaderError, EpochPlan, ShardSet

STATE_VERSION = 1


def check_version(state) -> None:
    if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
        got = state.get("version") if isinstance(state, dict) else state
        raise DataLoaderError(f"unsupported loader state (version {got!r}); expected version {STATE_VERSION}")


def resume_mismatch(state: dict, *, kind: str, world_size: int, seed: int, micro_batch: int, reader: Reader,
                    shard_set: ShardSet, plan_for: Callable[[set[str]], EpochPlan]
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
    if not reader.compatible(state.get("reader")):
        return "the reader settings changed (data.num_threads)", None
    excluded = set(state["excluded"])
    damaged = shard_set.preflight(s for s in shard_set.shards if s.name not in excluded)
    if damaged:
        return f"shard(s) {sorted(damaged)} were damaged since the save", None
    plan = plan_for(excluded)
    if plan.steps != state["steps_per_epoch"]:
        return f"the epoch now has {plan.steps} steps, the saved one had {state['steps_per_epoch']}", None
    return None, plan
