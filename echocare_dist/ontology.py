"""The anatomy ontology: body region -> organ -> structure, a DAG over C nodes.

Everything downstream indexes nodes by position in `Ontology.names`: label vectors in shards,
logits of the hierarchical head, and the ancestor / descendant tables that the fused loss
kernels read. The ontology hash (order-sensitive) is stored in shard manifests, checkpoints
and exports, so a model is never silently paired with a differently ordered label space.

Label closure (SPEC 3.2), per image naming its deepest known node(s):
  named nodes and all their ancestors -> 1; descendants of a named node -> -1 (unknown),
  unless positive themselves; every other node -> 0; no label at all -> all -1.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import yaml

POSITIVE, NEGATIVE, IGNORE = 1, 0, -1
PAD = -1  # padding value of the index tables


class OntologyError(ValueError):
    pass


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML keeps the last of two equal keys silently; a duplicated node name must fail."""


def _construct_unique_mapping(loader, node, deep=False):
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise OntologyError(f"duplicate node name {key!r} (line {key_node.start_mark.line + 1})")
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_unique_mapping)


@dataclass(frozen=True)
class Ontology:
    names: tuple[str, ...]
    parents: tuple[tuple[int, ...], ...]
    title: str = "ontology"

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_edges(cls, names: Sequence[str], parent_names: dict[str, Sequence[str]],
                   title: str = "ontology", source: str = "<memory>") -> "Ontology":
        index: dict[str, int] = {}
        for n in names:
            if not isinstance(n, str) or not n.strip():
                raise OntologyError(f"{source}: node names must be non-empty strings, got {n!r}")
            if n in index:
                raise OntologyError(f"{source}: duplicate node name {n!r}")
            index[n] = len(index)
        parents: list[list[int]] = [[] for _ in names]
        for child, plist in parent_names.items():
            if child not in index:
                raise OntologyError(f"{source}: unknown node {child!r} (given parents {list(plist)})")
            for p in plist:
                if p not in index:
                    raise OntologyError(f"{source}: node {child!r} names unknown parent {p!r}")
                if p == child:
                    raise OntologyError(f"{source}: node {child!r} is its own parent (cycle)")
                if index[p] not in parents[index[child]]:
                    parents[index[child]].append(index[p])
        onto = cls(tuple(names), tuple(tuple(sorted(p)) for p in parents), title)
        onto._check_acyclic(source)
        return onto

    @classmethod
    def from_yaml(cls, path: str | Path) -> "Ontology":
        path = Path(path)
        try:
            data = yaml.load(path.read_text(), Loader=_UniqueKeyLoader)
        except OSError as exc:
            raise OntologyError(f"cannot read ontology {path}: {exc.strerror}") from exc
        except OntologyError as exc:
            raise OntologyError(f"{path}: {exc}") from exc
        except yaml.YAMLError as exc:
            raise OntologyError(f"{path}: invalid YAML: {exc}") from exc
        return cls.from_dict(data, source=str(path))

    @classmethod
    def from_dict(cls, data: dict, source: str = "<dict>") -> "Ontology":
        if not isinstance(data, dict):
            raise OntologyError(f"{source}: expected a mapping with 'tree' or 'nodes'")
        names: list[str] = []
        parent_names: dict[str, list[str]] = {}

        def add(name, parent):
            name = str(name)
            if name in parent_names:
                if parent is not None:
                    raise OntologyError(f"{source}: duplicate node name {name!r} (use extra_parents for a DAG)")
                raise OntologyError(f"{source}: duplicate node name {name!r}")
            names.append(name)
            parent_names[name] = [parent] if parent is not None else []

        def walk(tree, parent):
            if tree is None:
                return
            if isinstance(tree, list):
                for leaf in tree:
                    if isinstance(leaf, dict):
                        walk(leaf, parent)
                    else:
                        add(leaf, parent)
                return
            if not isinstance(tree, dict):
                raise OntologyError(f"{source}: under {parent!r} expected a mapping, a list or null, got {tree!r}")
            for name, children in tree.items():
                add(name, parent)
                walk(children, str(name))

        if "tree" in data:
            walk(data["tree"], None)
        elif "nodes" in data:  # flat form: [{name: x, parents: [..]}]
            for item in data["nodes"]:
                if not isinstance(item, dict) or "name" not in item:
                    raise OntologyError(f"{source}: each entry of 'nodes' needs a 'name', got {item!r}")
                add(item["name"], None)
                parent_names[str(item["name"])] = [str(p) for p in item.get("parents") or []]
        else:
            raise OntologyError(f"{source}: expected a 'tree' or a 'nodes' section")
        for child, extra in (data.get("extra_parents") or {}).items():
            if str(child) not in parent_names:
                raise OntologyError(f"{source}: extra_parents names unknown node {child!r}")
            parent_names[str(child)] += [str(p) for p in (extra or [])]
        return cls.from_edges(names, parent_names, title=str(data.get("name", "ontology")), source=source)

    def _check_acyclic(self, source: str) -> None:
        state = [0] * len(self.names)  # 0 new, 1 on stack, 2 done
        for start in range(len(self.names)):
            if state[start]:
                continue
            stack = [(start, iter(self.parents[start]))]
            state[start] = 1
            path = [start]
            while stack:
                node, it = stack[-1]
                nxt = next(it, None)
                if nxt is None:
                    state[node] = 2
                    stack.pop()
                    path.pop()
                elif state[nxt] == 1:
                    cyc = path[path.index(nxt):] + [nxt]
                    raise OntologyError(f"{source}: cycle in ontology: "
                                        + " -> ".join(self.names[i] for i in cyc) + " (child -> parent)")
                elif state[nxt] == 0:
                    state[nxt] = 1
                    stack.append((nxt, iter(self.parents[nxt])))
                    path.append(nxt)

    # ---------------------------------------------------------------- basic views
    def __len__(self) -> int:
        return len(self.names)

    @property
    def num_nodes(self) -> int:
        return len(self.names)

    @cached_property
    def index(self) -> dict[str, int]:
        return {n: i for i, n in enumerate(self.names)}

    def node(self, name: str) -> int:
        try:
            return self.index[name]
        except KeyError:
            raise OntologyError(f"unknown ontology node {name!r}") from None

    @cached_property
    def children(self) -> tuple[tuple[int, ...], ...]:
        ch: list[list[int]] = [[] for _ in self.names]
        for c, ps in enumerate(self.parents):
            for p in ps:
                ch[p].append(c)
        return tuple(tuple(sorted(c)) for c in ch)

    @cached_property
    def depth(self) -> tuple[int, ...]:
        """Length of the shortest path to a root: regions 0, organs 1, structures 2.

        Shortest, so that an extra DAG edge (gestational_sac under uterus as well as fetus) does
        not push a node and its subtree down a level."""
        memo: dict[int, int] = {}

        def d(v):
            if v not in memo:
                memo[v] = 0 if not self.parents[v] else 1 + min(d(p) for p in self.parents[v])
            return memo[v]
        return tuple(d(v) for v in range(len(self.names)))

    @cached_property
    def topological_order(self) -> tuple[int, ...]:
        order, seen = [], set()

        def visit(v):
            if v in seen:
                return
            seen.add(v)
            for p in self.parents[v]:
                visit(p)
            order.append(v)
        for v in range(len(self.names)):
            visit(v)
        return tuple(order)

    @cached_property
    def roots(self) -> tuple[int, ...]:
        return tuple(v for v, p in enumerate(self.parents) if not p)

    @cached_property
    def hash(self) -> str:
        canon = json.dumps({"names": list(self.names), "parents": [list(p) for p in self.parents]},
                           separators=(",", ":"))
        return hashlib.sha256(canon.encode()).hexdigest()[:16]

    def to_dict(self) -> dict:
        return {"name": self.title, "hash": self.hash,
                "nodes": [{"name": n, "parents": [self.names[p] for p in ps]}
                          for n, ps in zip(self.names, self.parents)]}

    # ---------------------------------------------------------------- closures
    @cached_property
    def ancestors_dense(self) -> np.ndarray:
        """bool (C, C): [v, u] is True iff u is v or an ancestor of v (A*(v))."""
        C = len(self.names)
        anc = np.eye(C, dtype=bool)
        # Parents before children (topological order) so each parent row is complete.
        for v in self.topological_order:
            for p in self.parents[v]:
                anc[v] |= anc[p]
        anc.setflags(write=False)
        return anc

    @cached_property
    def descendants_dense(self) -> np.ndarray:
        """bool (C, C): [v, u] is True iff u is v or a descendant of v (D*(v))."""
        d = np.ascontiguousarray(self.ancestors_dense.T)
        d.setflags(write=False)
        return d

    @staticmethod
    def _padded(dense: np.ndarray) -> np.ndarray:
        width = int(dense.sum(1).max()) if dense.size else 1
        table = np.full((dense.shape[0], max(width, 1)), PAD, dtype=np.int32)
        for v in range(dense.shape[0]):
            idx = np.flatnonzero(dense[v])
            table[v, : len(idx)] = idx
        table.setflags(write=False)
        return table

    @cached_property
    def ancestor_table(self) -> np.ndarray:
        """int32 (C, A): A*(v) as ascending node indices, padded with -1."""
        return self._padded(self.ancestors_dense)

    @cached_property
    def descendant_table(self) -> np.ndarray:
        """int32 (C, D): D*(v) as ascending node indices, padded with -1."""
        return self._padded(self.descendants_dense)

    # ---------------------------------------------------------------- labels
    def label_vector(self, named: Iterable[str | int]) -> np.ndarray:
        """int8 (C,) in {1, 0, -1} from an image's named (deepest known) nodes."""
        idx = [self.node(n) if isinstance(n, str) else int(n) for n in named]
        C = len(self.names)
        if not idx:
            return np.full(C, IGNORE, dtype=np.int8)
        anc, desc = self.ancestors_dense, self.descendants_dense
        positive = anc[idx].any(0)
        unknown = desc[idx].any(0) & ~positive
        out = np.full(C, NEGATIVE, dtype=np.int8)
        out[unknown] = IGNORE
        out[positive] = POSITIVE
        return out

    def label_matrix(self, batch: Sequence[Iterable[str | int]]) -> np.ndarray:
        return np.stack([self.label_vector(n) for n in batch]) if batch else np.zeros((0, len(self)), np.int8)

    def positive_names(self, vector: np.ndarray) -> list[str]:
        return [self.names[i] for i in np.flatnonzero(np.asarray(vector) == POSITIVE)]

    def deepest_names(self, vector: np.ndarray) -> list[str]:
        """The positive nodes none of whose descendants is positive (what the image 'names')."""
        pos = np.asarray(vector) == POSITIVE
        out = []
        for v in np.flatnonzero(pos):
            kids = self.descendants_dense[v].copy()
            kids[v] = False
            if not (pos & kids).any():
                out.append(self.names[v])
        return out


def load_ontology(path: str | Path) -> Ontology:
    return Ontology.from_yaml(path)
