"""Ontology: structure of the default tree, closures, the SPEC 3.2 label rule, and bad input."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from echocare_dist.kernels import coherent_probs
from echocare_dist.ontology import IGNORE, NEGATIVE, PAD, POSITIVE, Ontology, OntologyError


def test_default_ontology_matches_report_counts(ontology):
    levels = np.bincount(np.array(ontology.depth))
    assert list(levels) == [9, 52, 56]  # report: 9 regions, 52 organ types, 56 structures
    regions = {ontology.names[r] for r in ontology.roots}
    assert regions == {"head", "chest", "abdomen", "limbs", "back", "fetus", "dorsum", "pelvis", "other"}


def test_closures_agree_with_parents(ontology):
    anc, desc = ontology.ancestors_dense, ontology.descendants_dense
    assert (anc == desc.T).all() and anc.diagonal().all()
    for v, parents in enumerate(ontology.parents):
        for p in parents:
            assert anc[v, p] and (anc[v] | anc[p] == anc[v]).all()
    # DAG edge: lateral_ventricle is under brain AND fetal_head
    lv = ontology.node("lateral_ventricle")
    assert anc[lv, ontology.node("brain")] and anc[lv, ontology.node("fetal_head")]
    assert anc[lv, ontology.node("head")] and anc[lv, ontology.node("fetus")]


def test_padded_tables_match_dense(ontology):
    for table, dense in ((ontology.ancestor_table, ontology.ancestors_dense),
                         (ontology.descendant_table, ontology.descendants_dense)):
        assert table.dtype == np.int32 and table.shape[0] == len(ontology)
        for v in range(len(ontology)):
            row = table[v][table[v] != PAD]
            assert list(row) == sorted(row) and set(row) == set(np.flatnonzero(dense[v]))
            assert (table[v][len(row):] == PAD).all()


def test_label_rule(ontology):
    vec = ontology.label_vector(["thyroid_nodule"])
    pos = {ontology.names[i] for i in np.flatnonzero(vec == POSITIVE)}
    assert pos == {"thyroid_nodule", "thyroid", "head"}
    assert vec[ontology.node("breast")] == NEGATIVE and vec[ontology.node("thyroid_lobe")] == NEGATIVE
    organ = ontology.label_vector(["thyroid"])
    # descendants of a named node are unknown, not negative
    for child in ("thyroid_nodule", "thyroid_lobe", "thyroid_isthmus"):
        assert organ[ontology.node(child)] == IGNORE
    assert organ[ontology.node("head")] == POSITIVE and organ[ontology.node("brain")] == NEGATIVE
    assert (ontology.label_vector([]) == IGNORE).all()
    both = ontology.label_vector(["thyroid", "thyroid_nodule"])
    assert both[ontology.node("thyroid_nodule")] == POSITIVE and both[ontology.node("thyroid_lobe")] == IGNORE
    assert ontology.deepest_names(both) == ["thyroid_nodule"]


def test_label_rule_on_dag(ontology):
    vec = ontology.label_vector(["gestational_sac"])
    assert vec[ontology.node("uterus")] == POSITIVE and vec[ontology.node("fetus")] == POSITIVE
    assert vec[ontology.node("yolk_sac")] == IGNORE and vec[ontology.node("ovary")] == NEGATIVE


def test_coherent_probs_never_child_above_parent(ontology):
    rng = np.random.default_rng(0)
    logits = torch.from_numpy(rng.normal(0, 3, (16, len(ontology))))
    q = coherent_probs(logits, ontology.descendant_table).numpy()
    for v, parents in enumerate(ontology.parents):
        for p in parents:
            assert (q[:, p] >= q[:, v]).all()


def test_hash_changes_with_order_and_edges():
    a = Ontology.from_dict({"tree": {"r": ["x", "y"]}})
    b = Ontology.from_dict({"tree": {"r": ["y", "x"]}})
    c = Ontology.from_dict({"tree": {"r": ["x", "y"]}, "extra_parents": {"y": ["x"]}})
    assert len({a.hash, b.hash, c.hash}) == 3
    assert a.hash == Ontology.from_dict({"tree": {"r": ["x", "y"]}}).hash


@pytest.mark.parametrize("data, message", [
    ({"tree": {"r": ["x"], "s": ["x"]}}, "duplicate node name 'x'"),
    ({"tree": {"r": ["x", "y"]}, "extra_parents": {"x": ["y"], "y": ["x"]}}, "cycle in ontology"),
    ({"tree": {"r": ["x"]}, "extra_parents": {"x": ["nowhere"]}}, "unknown parent 'nowhere'"),
    ({"tree": {"r": ["x"]}, "extra_parents": {"ghost": ["r"]}}, "unknown node 'ghost'"),
    ({"nodes": [{"name": "a", "parents": ["a"]}]}, "its own parent"),
    ({"something": 1}, "expected a 'tree' or a 'nodes' section"),
])
def test_bad_ontologies_fail_clearly(data, message):
    with pytest.raises(OntologyError, match=message):
        Ontology.from_dict(data)


def test_duplicate_yaml_keys_are_caught(tmp_path):
    p = tmp_path / "dup.yaml"
    p.write_text("tree:\n  head:\n    brain: null\n    brain: [x]\n")
    with pytest.raises(OntologyError, match="duplicate node name 'brain'"):
        Ontology.from_yaml(p)


def test_unknown_label_names_the_node(ontology):
    with pytest.raises(OntologyError, match="'spleeen'"):
        ontology.label_vector(["spleeen"])


def test_random_dags_closure_is_transitive():
    rng = np.random.default_rng(1)
    for _ in range(5):
        n = 30
        names = [f"n{i}" for i in range(n)]
        parents = {names[i]: [names[j] for j in range(i) if rng.random() < 0.1] for i in range(n)}
        onto = Ontology.from_edges(names, parents)
        anc = onto.ancestors_dense
        for a, b, c in itertools.product(range(0, n, 3), repeat=3):
            if anc[a, b] and anc[b, c]:
                assert anc[a, c]
