"""Drill-down re-clustering and the browsable group hierarchy."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from explorer.stages.hierarchy import (
    MIN_RECLUSTER,
    UnknownGroup,
    build_hierarchy,
    normalize_group_id,
    recluster,
)


def blobs(n_blobs=3, per=40, dim=32, seed=0, spread=0.15):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_blobs, dim))
    X = np.concatenate([c + rng.normal(scale=spread, size=(per, dim)) for c in centres])
    truth = np.repeat(np.arange(n_blobs), per)
    return X.astype(np.float32), truth


# ------------------------------------------------------------------ recluster
@pytest.fixture(scope="module")
def three_blobs():
    X, truth = blobs(3, 40)
    res = recluster(X, parent_id="3", seed=7)
    return X, truth, res


def test_recluster_finds_the_sub_blobs_with_dotted_ids(three_blobs):
    X, truth, res = three_blobs
    xy, sub_ids = res  # unpacks like a pair
    assert xy.shape == (len(X), 2) and np.isfinite(xy).all()
    assert len(sub_ids) == len(X)
    found = sorted({s for s in sub_ids if not s.endswith(".noise")}, key=lambda s: int(s[2:]))
    # numbered 3.1, 3.2, ... without gaps; at least one per blob (the clustering may split
    # a blob further, but never puts two blobs in one sub-cluster)
    assert found == [f"3.{i}" for i in range(1, len(found) + 1)] and len(found) >= 3
    ids = np.array(sub_ids)
    for sid in found:
        members = truth[ids == sid]
        assert np.bincount(members).max() >= 0.95 * len(members)
    for b in range(3):
        assert (~np.char.endswith(ids[truth == b].astype(str), ".noise")).mean() >= 0.8


def test_recluster_is_deterministic_with_the_seed(three_blobs):
    X, _, res = three_blobs
    again = recluster(X, parent_id="3", seed=7)
    assert again.sub_ids == res.sub_ids
    assert np.allclose(again.xy, res.xy)


def test_recluster_numbers_largest_first_and_nests():
    rng = np.random.default_rng(1)
    big, _ = blobs(1, 60, seed=2)
    small, _ = blobs(1, 20, seed=3)
    X = np.concatenate([small, big])
    res = recluster(X, parent_id="3.2", seed=1)
    named = [s for s in res.sub_ids if not s.endswith("noise")]
    assert {s.rsplit(".", 1)[0] for s in res.sub_ids} == {"3.2"}
    assert named.count("3.2.1") > named.count("3.2.2") > 0
    del rng


def test_recluster_builds_one_neighbour_graph_for_map_and_clustering(monkeypatch):
    from explorer.stages import knn

    real, calls = knn.knn_graph, []
    monkeypatch.setattr(knn, "knn_graph", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    X, truth = blobs(2, 30, seed=4)
    res = recluster(X, parent_id="4", seed=3)
    assert len(calls) == 1
    # and the one graph still separates the two blobs
    from collections import Counter

    main = [Counter(s for s, t in zip(res.sub_ids, truth) if t == b).most_common(1)[0][0] for b in (0, 1)]
    assert main[0] != main[1] and not any(m.endswith("noise") for m in main)


@pytest.mark.parametrize("n", range(1, MIN_RECLUSTER))
def test_tiny_selections_work_and_say_so(n):
    X, _ = blobs(1, n)
    res = recluster(X, parent_id=3, seed=0)
    assert res.xy.shape == (n, 2) and np.isfinite(res.xy).all()
    assert res.sub_ids == ["3.1"] * n
    assert any("too few" in note for note in res.notes)


def test_noise_gets_its_own_sub_id_when_kept(monkeypatch):
    # Which far-off points UMAP + HDBSCAN call noise depends on the library versions; what
    # recluster owns is the mapping: kept noise (-1) and only kept noise reads "7.noise".
    from explorer.stages import cluster as cluster_mod

    real = cluster_mod.cluster
    kept_noise = []

    def cluster_keeping_noise(Z, method, **kw):
        res = real(Z, method, **kw)
        labels = np.asarray(res.labels).copy()
        labels[-3:] = -1  # the three far points, as HDBSCAN with assign_noise=False may leave them
        kept_noise.append(kw.get("assign_noise"))
        return dataclasses.replace(res, labels=labels)

    monkeypatch.setattr(cluster_mod, "cluster", cluster_keeping_noise)
    X, _ = blobs(2, 40, seed=5)
    far = np.random.default_rng(9).normal(size=(3, X.shape[1])).astype(np.float32) * 10
    res = recluster(np.concatenate([X, far]), "7", seed=0, assign_noise=False)
    assert kept_noise == [False]  # the caller's clustering parameter reaches the clustering
    assert all(s.startswith("7.") for s in res.sub_ids)
    assert {"7.1", "7.2"} <= set(res.sub_ids)
    assert all(s == "7.noise" or s[2:].isdigit() for s in res.sub_ids)
    assert res.sub_ids[-3:] == ["7.noise"] * 3
    assert [s == "7.noise" for s in res.sub_ids] == [int(l) == -1 for l in res.labels]


def test_structureless_selection_is_one_group_with_a_note():
    X = np.ones((30, 8), dtype=np.float32)  # thirty identical images
    res = recluster(X, "5", seed=0)
    assert set(res.sub_ids) <= {"5.1", "5.noise"}
    assert res.notes


@pytest.mark.parametrize(
    "args, kw",
    [
        ((np.zeros((0, 4)),), {}),
        ((np.zeros(4),), {}),
        ((np.full((8, 4), np.nan),), {}),
        ((np.zeros((8, 4)), ""), {}),
        ((np.zeros((8, 4)), "a b"), {}),
        ((np.zeros((8, 4)),), {"seed": -1}),
        ((np.zeros((8, 4)),), {"min_cluster_size": 0}),
        ((np.zeros((3, 4)),), {"method": "magic"}),
    ],
)
def test_recluster_bad_input(args, kw):
    with pytest.raises(ValueError):
        recluster(*args, **kw)


# ------------------------------------------------------------------ hierarchy
@pytest.fixture(scope="module")
def tree_and_data():
    X, truth = blobs(5, 120, dim=96, seed=4, spread=0.3)
    return build_hierarchy(X, branching=16, min_size=50, seed=0), X, truth


def test_ids_counts_and_members_partition(tree_and_data):
    tree, X, _ = tree_and_data
    root = tree.node("root")
    assert root.count == len(X) and root.parent is None
    kids = tree.children("root")
    assert 2 <= len(kids) <= 16
    assert [k.id for k in kids] == [f"root-{i}" for i in range(1, len(kids) + 1)]
    assert [k.count for k in kids] == sorted((k.count for k in kids), reverse=True)
    # every level partitions its parent
    for node in tree:
        if node.children:
            parts = np.concatenate([tree.node(c).members for c in node.children])
            assert np.array_equal(np.sort(parts), node.members)
        else:
            assert node.count <= 50 or node.depth == tree.params["max_depth"]
    assert tree.depth >= 2  # 600 images in groups of <= 50 need two levels


def test_top_level_follows_the_blobs(tree_and_data):
    tree, _, truth = tree_and_data
    for kid in tree.children("root"):
        labels = truth[kid.members]
        assert np.bincount(labels).max() >= 0.9 * kid.count  # a group is (mostly) one blob


def test_representatives_are_members_near_the_centre(tree_and_data):
    tree, _, _ = tree_and_data
    for node in list(tree)[:20]:
        reps = node.representatives
        assert 1 <= len(reps) <= 4 and set(reps) <= set(node.members)
    # in few dimensions (no PCA) they are exactly the members nearest the group's centre
    X, _ = blobs(4, 60, dim=16, seed=7, spread=0.4)
    small = build_hierarchy(X, branching=4, min_size=30, seed=0)
    Y = X / np.linalg.norm(X, axis=1, keepdims=True)
    for node in small:
        m = np.asarray(node.members)
        d = ((Y[m] - Y[m].mean(axis=0)) ** 2).sum(axis=1)
        nearest = m[np.argsort(d, kind="stable")[: len(node.representatives)]]
        assert sorted(np.asarray(node.representatives).tolist()) == sorted(nearest.tolist()), node.id


def test_jump_by_typed_id(tree_and_data):
    tree, _, _ = tree_and_data
    deep = max(tree, key=lambda n: n.depth)
    parts = deep.id.split("-")[1:]
    for typed in [deep.id, "-".join(parts), " ROOT/" + "/".join(parts) + " ",
                  ".".join(p.zfill(2) for p in parts)]:
        assert tree.node(typed) is deep
    assert tree.breadcrumbs(deep.id)[0] == "root"
    assert tree.breadcrumbs(deep.id)[-1] == deep.id
    assert len(tree.breadcrumbs(deep.id)) == deep.depth + 1
    assert tree.parent(deep.id).id == tree.breadcrumbs(deep.id)[-2]


def test_bad_ids_raise_clear_errors(tree_and_data):
    tree, _, _ = tree_and_data
    with pytest.raises(ValueError, match="not a group id"):
        tree.node("root-x")
    with pytest.raises(KeyError) as err:
        tree.node("root-99")
    assert "no group 'root-99'" in str(err.value) and "root has" in str(err.value)
    with pytest.raises(UnknownGroup, match="root-1"):
        tree.node("root-1-99-3")
    assert "root-99" not in tree and "garbage!" not in tree and "root-1" in tree


def test_path_of_and_assignments_agree(tree_and_data):
    tree, X, _ = tree_and_data
    a1 = tree.assignments(1)
    for i in (0, 123, len(X) - 1):
        path = tree.path_of(i)
        assert path[0] == "root" and i in tree.node(path[-1]).members
        assert a1[i] == path[1]
    assert set(tree.assignments(0)) == {"root"}


def test_deterministic_with_the_seed(tree_and_data):
    tree, X, _ = tree_and_data
    again = build_hierarchy(X, branching=16, min_size=50, seed=0)
    assert list(again.nodes) == list(tree.nodes)
    assert all(np.array_equal(again.nodes[k].members, tree.nodes[k].members) for k in tree.nodes)


def test_small_and_degenerate_sets():
    one = build_hierarchy(np.ones((1, 4)))
    assert len(one) == 1 and one.root.count == 1 and one.children("root") == []
    same = build_hierarchy(np.ones((200, 4)), min_size=10)
    assert len(same) == 1  # identical images cannot be split
    few = build_hierarchy(np.random.default_rng(0).normal(size=(30, 4)), min_size=10, branching=4)
    assert 2 <= len(few.children("root")) <= 4


@pytest.mark.parametrize(
    "kw", [{"branching": 1}, {"min_size": 0}, {"seed": "x"}, {"n_representatives": 0}]
)
def test_hierarchy_bad_parameters(kw):
    with pytest.raises(ValueError):
        build_hierarchy(np.ones((10, 4)), **kw)


def test_normalize_group_id():
    assert normalize_group_id("") == "root"
    assert normalize_group_id("3") == "root-3"
    assert normalize_group_id(3) == "root-3"
    with pytest.raises(ValueError):
        normalize_group_id("root-\u0663")  # non-ASCII digit
