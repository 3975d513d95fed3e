"""Per-source mixture: the realised per-source shares over whole epochs against the configured ones.

Writes its own shards with sources of very different sizes (a large "video" source, a few small
ones), then for each setting draws the epoch plans of every rank (data/shards.make_plan with the
run's Mixture), counts the sources of the samples the ranks consume in each epoch (steps x
micro-batch per rank, so the end-of-epoch remainder is not counted) and prints configured vs
realised share and how often a sample of each source is read. `--loader pil|dali` also reads one
epoch through the real loader on every rank (decoding) and counts the keys it returns.

    .venv/bin/python benchmarks/mixture.py
    .venv/bin/python benchmarks/mixture.py --sizes 20000,2000,300,40 --ranks 8 --loader pil
"""
from __future__ import annotations

import argparse
import collections
import sys
import tempfile
from pathlib import Path

from hardware import describe  # benchmarks/hardware.py (the script's folder is on sys.path)

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from echocare_dist.config import load_config  # noqa: E402
from echocare_dist.data import build_loader  # noqa: E402
from echocare_dist.data.mixture import Mixture  # noqa: E402
from echocare_dist.data.shards import ShardSet, TarReader, make_plan  # noqa: E402
from echocare_dist.data.testing import write_shards  # noqa: E402
from echocare_dist.ontology import load_ontology  # noqa: E402

SOURCES = ("video", "cardiac", "thyroid", "fetal")


def write(root: Path, ontology, sizes: list[int], shard_size: int) -> list[str]:
    names = [s for s, n in zip(SOURCES, sizes) for _ in range(n)]
    order = np.random.default_rng(0).permutation(len(names))   # the builder shuffles across tars
    names = [names[i] for i in order]
    total = len(names)
    counts = [shard_size] * (total // shard_size) + ([total % shard_size] if total % shard_size else [])
    write_shards(root, ontology, tuple(counts), size=(32, 24), distinct_images=8, sources=names)
    return names


def plan_shares(cfg, ontology, ranks: int, epochs: int) -> tuple[dict, collections.Counter, int]:
    ss = ShardSet.open(cfg.resolve_path(cfg.data.shards), ontology)
    mix = Mixture(ss, cfg.data)
    counts, consumed = collections.Counter(), 0
    for epoch in range(epochs):
        for rank in range(ranks):
            plan = make_plan(ss, [], epoch=epoch, seed=cfg.data.seed, rank=rank, world_size=ranks,
                             micro_batch=cfg.train.micro_batch, mixture=mix)
            take = plan.positions()[: plan.steps * plan.micro_batch]
            counts.update(mix.source_of(shard, i) for shard, i in plan.refs(take))
            consumed += len(take)
    return mix.effective(ss.shards), counts, consumed


def loader_shares(cfg, ontology, ranks: int, source_of_key: dict) -> collections.Counter:
    counts = collections.Counter()
    for rank in range(ranks):
        ld = build_loader(cfg, ontology, rank=rank, world_size=ranks, device="cpu", run_dir=None)
        try:
            for _ in range(ld.steps_per_epoch):
                counts.update(source_of_key[k] for k in next(ld)["keys"])
        finally:
            ld.close()
    return counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="6000,900,120,30", help="samples per source (video, cardiac, thyroid, fetal)")
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--shard-size", type=int, default=500)
    ap.add_argument("--loader", choices=["none", "pil", "dali"], default="none")
    args = ap.parse_args()
    sizes = [int(x) for x in args.sizes.split(",")]
    if not 1 <= len(sizes) <= len(SOURCES):
        ap.error(f"--sizes: 1 to {len(SOURCES)} sources")
    base = load_config("tiny_cpu", [])
    ontology = load_ontology(base.resolve_path(base.ontology.path))
    settings = [("source_alpha=1 (as stored)", "data.source_alpha=1"),
                ("source_alpha=0.5", "data.source_alpha=0.5"),
                ("source_alpha=0 (sources alike)", "data.source_alpha=0"),
                ("source_weights", "data.source_weights={" + ", ".join(
                    f"{s}: {w}" for s, w in zip(SOURCES, (1, 2, 3, 4)[:len(sizes)])) + "}")]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "shards"
        write(root, ontology, sizes, args.shard_size)
        print(describe())
        print(f"{sum(sizes)} samples: " + ", ".join(f"{s} {n}" for s, n in zip(SOURCES, sizes)) +
              f"; {args.ranks} rank(s), micro-batch {args.batch}, {args.epochs} epoch(s)")
        worst = 0.0
        for title, option in settings:
            cfg = load_config("tiny_cpu", [f"data.shards={root}", f"train.micro_batch={args.batch}", option,
                                           f"data.loader={args.loader if args.loader != 'none' else 'pil'}",
                                           "data.num_threads=0", "data.device=cpu"])
            effective, counts, consumed = plan_shares(cfg, ontology, args.ranks, args.epochs)
            print(f"\n{title}  ({consumed} samples consumed)")
            print(f"  {'source':10s} {'samples':>8s} {'natural':>8s} {'config':>8s} {'realised':>9s} {'reads/sample':>13s}")
            for source, row in effective.items():
                realised = counts[source] / consumed
                worst = max(worst, abs(realised - row["share"]))
                print(f"  {source:10s} {row['samples']:8d} {row['natural_share']:8.4f} {row['share']:8.4f} "
                      f"{realised:9.4f} {row['reads_per_sample']:13.2f}")
            if args.loader != "none":
                ss = ShardSet.open(root, ontology)
                mix = Mixture(ss, cfg.data)
                reader = TarReader(len(ontology))
                source_of_key = {reader.key(s, i): mix.source_of(s, i) for s in ss.shards for i in range(s.samples)}
                reader.close()
                got = loader_shares(cfg, ontology, args.ranks, source_of_key)
                n = sum(got.values())
                print(f"  {args.loader} loader, epoch 0: " +
                      ", ".join(f"{s} {got[s] / n:.4f}" for s in effective))
        print(f"\nlargest |realised - configured| share: {worst:.4f}")


if __name__ == "__main__":
    main()
