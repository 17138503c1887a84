"""Retrieval metrics (ReID, face verification, SOP Recall@K) on hand-computed cases, edge
cases, and a brute-force re-implementation of the Market-1501 protocol on random data."""

from __future__ import annotations

import numpy as np
import pytest

from ofa_ufo.metrics import get_metric, list_metrics, recall_at_k, reid_metrics, verification_accuracy
from ofa_ufo.metrics import retrieval

# --- ReID ----------------------------------------------------------------------------------------
# 1-D features with distance="euclidean": the distance is |query - gallery|, readable by eye.
#
# gallery   position  identity  camera
#   g0        1.0       1         2
#   g1        2.0       2         1
#   g2        3.0       1         1
#   g3        4.0       1         3
#   g4        5.0      -1 (junk)  2
#   g5        6.0       0 (distractor) 1
GALLERY = [[1.0], [2.0], [3.0], [4.0], [5.0], [6.0]]
GALLERY_IDS, GALLERY_CAMS = [1, 2, 1, 1, -1, 0], [2, 1, 1, 3, 2, 1]
# q0 at 0.0, identity 1, camera 1: order g0 g1 g2 g3 g4 g5; g2 (same id + camera) and g4 (junk)
#    are removed -> g0 g1 g3 g5 = match, miss, match, miss.
#    first match at rank 1; AP = (1/1 + 2/3) / 2 = 5/6; INP = 2 matches / rank 3 = 2/3.
# q1 at 6.5, identity 2, camera 2: order g5 g4 g3 g2 g1 g0; g4 removed ->
#    g5 g3 g2 g1 g0 = miss, miss, miss, match, miss.
#    first match at rank 4; AP = 1/4; INP = 1/4.
# q2 at 2.0, identity 2, camera 1: its only match g1 shares its camera -> no valid match, skipped.
QUERIES, QUERY_IDS, QUERY_CAMS = [[0.0], [6.5], [2.0]], [1, 2, 2], [1, 2, 1]


def test_reid_hand_computed_market_protocol():
    result = reid_metrics(QUERIES, GALLERY, QUERY_IDS, GALLERY_IDS, QUERY_CAMS, GALLERY_CAMS, distance="euclidean")
    assert result == pytest.approx({
        "rank1": 1 / 2,  # q0 hits at rank 1, q1 only at rank 4
        "rank5": 1.0, "rank10": 1.0,
        "mAP": (5 / 6 + 1 / 4) / 2,  # 13/24
        "mINP": (2 / 3 + 1 / 4) / 2,  # 11/24
        "valid_queries": 2, "skipped_queries": 1,
    })


def test_reid_ranks_beyond_gallery_and_junk_query():
    # ranks larger than the gallery: rank 100 is "any match at all"; a junk query (-1) is skipped.
    result = reid_metrics(QUERIES + [[3.0]], GALLERY, QUERY_IDS + [-1], GALLERY_IDS, QUERY_CAMS + [2],
                          GALLERY_CAMS, ranks=(1, 4, 100), distance="euclidean")
    assert (result["rank1"], result["rank4"], result["rank100"]) == (0.5, 1.0, 1.0)
    assert (result["valid_queries"], result["skipped_queries"]) == (2, 2)


def test_reid_ties_follow_gallery_order():
    # query at 0: a non-match at +1 and a match at -1 are equally far; the earlier gallery item ranks first.
    args = dict(query_ids=[1], query_cams=[0], distance="euclidean")
    miss_first = reid_metrics([[0.0]], [[1.0], [-1.0]], gallery_ids=[2, 1], gallery_cams=[1, 1], **args)
    hit_first = reid_metrics([[0.0]], [[-1.0], [1.0]], gallery_ids=[1, 2], gallery_cams=[1, 1], **args)
    assert (miss_first["rank1"], miss_first["mAP"]) == (0.0, 0.5)  # match at rank 2: AP = 1/2
    assert (hit_first["rank1"], hit_first["mAP"]) == (1.0, 1.0)


def test_reid_cosine_ignores_feature_norm():
    # cosine distance: scaling a feature changes nothing; [1, 0] is nearer to [2, 0.1] than to [0, 3].
    result = reid_metrics([[1.0, 0.0]], [[0.0, 3.0], [2.0, 0.1]], [5], [6, 5], [0], [1, 1])
    assert (result["rank1"], result["mAP"], result["mINP"]) == (1.0, 1.0, 1.0)


def test_reid_errors():
    with pytest.raises(ValueError, match="none of the 1 queries has a valid gallery match"):
        reid_metrics([[0.0]], [[1.0]], [1], [1], [0], [0])  # same identity, same camera only
    with pytest.raises(ValueError, match="query_ids must be 1 integers"):
        reid_metrics([[0.0]], [[1.0]], [1, 2], [1], [0], [0])
    with pytest.raises(ValueError, match="differ in size"):
        reid_metrics([[0.0, 1.0]], [[1.0]], [1], [1], [0], [1])
    with pytest.raises(ValueError, match="distance must be"):
        reid_metrics([[0.0]], [[1.0]], [1], [1], [0], [1], distance="manhattan")


def brute_force_reid(queries, gallery, qids, gids, qcams, gcams, distance, ranks=(1, 5, 10)):
    """The protocol spelled out with plain loops: sort by (distance, index), filter, score."""
    def dist(a, b):
        if distance == "cosine":
            cos = sum(x * y for x, y in zip(a, b)) / (sum(x * x for x in a) ** 0.5 * sum(y * y for y in b) ** 0.5)
            return 1 - cos
        return sum((x - y) ** 2 for x, y in zip(a, b)) ** 0.5

    firsts, aps, inps = [], [], []
    for q, qid, qcam in zip(queries, qids, qcams):
        ranked = sorted(range(len(gallery)), key=lambda j: (dist(q, gallery[j]), j))
        kept = [j for j in ranked if gids[j] != -1 and not (gids[j] == qid and gcams[j] == qcam)]
        hits = [rank for rank, j in enumerate(kept, start=1) if gids[j] == qid]
        if qid == -1 or not hits:
            continue
        firsts.append(hits[0])
        aps.append(sum(n / rank for n, rank in enumerate(hits, start=1)) / len(hits))
        inps.append(len(hits) / hits[-1])
    result = {f"rank{k}": sum(f <= k for f in firsts) / len(firsts) for k in ranks}
    result.update(mAP=sum(aps) / len(aps), mINP=sum(inps) / len(inps), valid_queries=len(firsts),
                  skipped_queries=len(queries) - len(firsts))
    return result


@pytest.mark.parametrize("distance", ["cosine", "euclidean"])
def test_reid_matches_brute_force_on_random_data(distance, monkeypatch):
    rng = np.random.default_rng(7)
    queries, gallery = rng.normal(size=(25, 6)), rng.normal(size=(70, 6))
    qids, gids = rng.integers(-1, 8, size=25), rng.integers(-1, 8, size=70)
    qcams, gcams = rng.integers(0, 3, size=25), rng.integers(0, 3, size=70)
    expected = brute_force_reid(queries.tolist(), gallery.tolist(), qids.tolist(), gids.tolist(), qcams.tolist(),
                                gcams.tolist(), distance)
    assert expected["skipped_queries"] > 0  # the random data exercises skipping
    assert reid_metrics(queries, gallery, qids, gids, qcams, gcams, distance=distance) == pytest.approx(expected)
    monkeypatch.setattr(retrieval, "_CHUNK_ELEMENTS", 150)  # two queries per distance block
    assert reid_metrics(queries, gallery, qids, gids, qcams, gcams, distance=distance) == pytest.approx(expected)


# --- face verification ---------------------------------------------------------------------------

def test_verification_hand_computed_two_folds():
    # pairs:      0     1      2      3
    # score      0.9   0.1    0.6    0.7
    # same       yes   no     no     yes     folds=2 -> fold 0 = pairs 0,1; fold 1 = pairs 2,3
    # fold 0 held out: train on 0.6 (no), 0.7 (yes): candidates -0.4, 0.65, 1.7 -> 0.65 gets both
    #   right; held out: 0.9 > 0.65 same (right), 0.1 different (right) -> 1.0
    # fold 1 held out: train on 0.9 (yes), 0.1 (no): candidates -0.9, 0.5, 1.9 -> 0.5;
    #   held out: 0.6 > 0.5 says same (wrong), 0.7 same (right) -> 0.5
    # accuracy (1.0 + 0.5)/2 = 0.75, std 0.25, threshold (0.65 + 0.5)/2 = 0.575
    result = verification_accuracy([0.9, 0.1, 0.6, 0.7], [True, False, False, True], folds=2)
    assert result == pytest.approx({"accuracy": 0.75, "accuracy_std": 0.25, "threshold": 0.575})
    # explicit fold labels: folds {0, 2} and {1, 3}
    # fold 0 held out (pairs 0, 2): train 0.1 no, 0.7 yes -> threshold 0.4; 0.9 right, 0.6 wrong -> 0.5
    # fold 1 held out (pairs 1, 3): train 0.9 yes, 0.6 no -> threshold 0.75; 0.1 right, 0.7 wrong -> 0.5
    labelled = verification_accuracy([0.9, 0.1, 0.6, 0.7], [1, 0, 0, 1], folds=[0, 1, 0, 1])
    assert labelled == pytest.approx({"accuracy": 0.5, "accuracy_std": 0.0, "threshold": 0.575})


def test_verification_ties_and_separable_data():
    # equal scores cannot be split: every threshold is right on exactly half -> the lowest candidate
    # (score - 1, "all same") is kept, and each held-out pair of (same, different) scores 1/2.
    tied = verification_accuracy([0.3] * 4, [True, False, True, False], folds=2)
    assert tied == pytest.approx({"accuracy": 0.5, "accuracy_std": 0.0, "threshold": -0.7})
    # perfectly separable scores in 10 contiguous folds: 100 %
    rng = np.random.default_rng(0)
    same = rng.random(60) < 0.5
    scores = np.where(same, 0.5, -0.5) + rng.uniform(-0.4, 0.4, 60)
    assert verification_accuracy(scores, same)["accuracy"] == 1.0


def test_verification_lfw_folds_are_pairs_txt_folds():
    # 6000 pairs in pairs.txt order, 10 contiguous folds = LFW's ten folds of 600 pairs.
    labels = retrieval._fold_labels(10, 6000)
    assert [int((labels == f).sum()) for f in range(10)] == [600] * 10
    assert (labels[:600] == 0).all() and (labels[-600:] == 9).all()
    with pytest.raises(ValueError, match="folds must be between 2"):
        verification_accuracy([0.1, 0.2], [True, False], folds=1)
    with pytest.raises(ValueError, match="same booleans"):
        verification_accuracy([0.1, 0.2], [True], folds=2)


# --- SOP Recall@K --------------------------------------------------------------------------------

def test_recall_at_k_hand_computed():
    # 1-D features, euclidean; each item ranks the others by |x - y|:
    # item  x     class  nearest others (class)               first same-class rank
    #  i0   0.0   A      i1 1.0 (B), i2 3.0 (A)                2
    #  i1   1.0   B      i0 1.0 (A), i2 2.0 (A), i3 2.5 (B)    3
    #  i2   3.0   A      i3 0.5 (B), i1 2.0 (B), i0 3.0 (A)    3
    #  i3   3.5   B      i2 0.5 (A), i1 2.5 (B)                2
    #  i4  10.0   C      (no other C: never retrieved)         -
    #  i5  20.0   D      i6 0.5 (D)                            1
    #  i6  20.5   D      i5 0.5 (D)                            1
    feats = [[0.0], [1.0], [3.0], [3.5], [10.0], [20.0], [20.5]]
    labels = ["A", "B", "A", "B", "C", "D", "D"]
    result = recall_at_k(feats, labels, ks=(1, 2, 3, 100), distance="euclidean")
    # k = 100 exceeds the 6 other items: every item with a same-class partner counts (6 of 7).
    assert result == pytest.approx({"recall@1": 2 / 7, "recall@2": 4 / 7, "recall@3": 6 / 7, "recall@100": 6 / 7})


def test_recall_at_k_ties_follow_item_order():
    # i0 at 0 has a B at +1 and an A at -1, equally far: the earlier item ranks first.
    # [0 A, 1 B, -1 A]: i0 misses at k=1 (B first), i1 has no other B, i2's nearest is i0 (A) -> 1/3
    assert recall_at_k([[0.0], [1.0], [-1.0]], ["A", "B", "A"], ks=(1,), distance="euclidean") == {"recall@1": 1 / 3}
    # [0 A, -1 A, 1 B]: i0 and i1 hit, i2 has no other B -> 2/3
    assert recall_at_k([[0.0], [-1.0], [1.0]], ["A", "A", "B"], ks=(1,), distance="euclidean") == {"recall@1": 2 / 3}


def test_recall_at_k_self_excluded_but_duplicates_count():
    # two identical items of one class find each other at distance 0; the item itself never counts.
    assert recall_at_k([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], [1, 1, 2], ks=(1,))["recall@1"] == pytest.approx(2 / 3)


@pytest.mark.parametrize("distance", ["cosine", "euclidean"])
def test_recall_at_k_matches_brute_force(distance, monkeypatch):
    rng = np.random.default_rng(3)
    feats = np.round(rng.normal(size=(40, 3)), 1)  # coarse values: some exact distance ties
    labels = rng.integers(0, 12, size=40).tolist()
    dist = retrieval._distances(feats, feats, distance)
    expected = {}
    for k in (1, 3, 10, 50):
        hits = 0
        for i in range(40):
            others = sorted((j for j in range(40) if j != i), key=lambda j: (dist[i, j], j))
            hits += any(labels[j] == labels[i] for j in others[:k])
        expected[f"recall@{k}"] = hits / 40
    assert recall_at_k(feats, labels, ks=(1, 3, 10, 50), distance=distance) == pytest.approx(expected)
    monkeypatch.setattr(retrieval, "_CHUNK_ELEMENTS", 100)  # blocks of two queries
    assert recall_at_k(feats, labels, ks=(1, 3, 10, 50), distance=distance) == pytest.approx(expected)


# --- registry adapters ---------------------------------------------------------------------------

def test_retrieval_metrics_registered():
    assert {"reid", "verification", "recall@k"} <= set(list_metrics())


def test_reid_registry_form_matches_direct_call():
    # one embedding per image (plain list or the pipeline's {"embedding": ...}); meta dicts as references.
    predictions = [[x[0], 1.0] for x in QUERIES + GALLERY]
    predictions[0] = {"embedding": predictions[0]}
    references = [{"identity": i, "camera": c, "split": "query"} for i, c in zip(QUERY_IDS, QUERY_CAMS)]
    references += [{"identity": i, "camera": c, "split": "gallery"} for i, c in zip(GALLERY_IDS, GALLERY_CAMS)]
    feats = [[x[0], 1.0] for x in QUERIES + GALLERY]
    direct = reid_metrics(feats[:3], feats[3:], QUERY_IDS, GALLERY_IDS, QUERY_CAMS, GALLERY_CAMS)
    assert get_metric("reid")(predictions, references) == pytest.approx(direct)
    with pytest.raises(ValueError, match=r"split 'query' or 'gallery', found \['train'\]"):
        get_metric("reid")(predictions, [{**r, "split": "train"} for r in references])
    with pytest.raises(ValueError, match="reference 1 has no 'camera' field"):
        get_metric("reid")(predictions, [references[0], {"identity": 1, "split": "query"}] + references[2:])


def test_verification_registry_pairs_embeddings():
    # pair 0: same direction (cos 1, same); pair 1: orthogonal (cos 0, different);
    # pair 2: cos 0.8 (same); pair 3: cos 0.6 (different). Pairs and sides come in any order;
    # pairs 0-1 are fold 0, pairs 2-3 fold 1, as contiguous folds=2 would split them.
    unit = {1.0: [1.0, 0.0], 0.8: [0.8, 0.6], 0.6: [0.6, 0.8], 0.0: [0.0, 1.0]}
    cosines, same = [1.0, 0.0, 0.8, 0.6], [True, False, True, False]
    predictions, references = [], []
    for pair in (3, 1, 0, 2):
        meta = {"pair": pair, "same": same[pair], "fold": pair // 2}
        predictions += [unit[cosines[pair]], [2.0, 0.0]]
        references += [{**meta, "side": 1}, {**meta, "side": 0}]
    expected = verification_accuracy(cosines, same, folds=2)
    assert get_metric("verification")(predictions, references) == pytest.approx(expected)
    with pytest.raises(ValueError, match=r"sides 0 and 1 of every pair; incomplete pairs: \[3\]"):
        get_metric("verification")(predictions[1:], references[1:])


def test_recall_registry_takes_meta_or_labels():
    feats = [[0.0, 1.0], [0.1, 1.0], [1.0, 0.0], [1.0, 0.1]]
    expected = {"recall@1": 1.0, "recall@10": 1.0, "recall@100": 1.0}
    assert get_metric("recall@k")(feats, [7, 7, 8, 8]) == expected
    assert get_metric("recall@k")(feats, [{"identity": i} for i in (7, 7, 8, 8)]) == expected
