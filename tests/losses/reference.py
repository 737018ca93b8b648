"""Plain-numpy float64 references for the contrastive losses, written from docs/METHOD.md §3-§5.

Loops over anchors and pairs on purpose: they follow the sentences of the spec, not the
vectorised code under test. Shared by the loss tests and the loss benchmark; load this file by
path (tests/ is not a package), e.g. with importlib.util.spec_from_file_location.
"""

import numpy as np

# The anchor/negative position lists of docs/METHOD.md §5, transcribed by hand into indices of
# the 17 paper positions:
# 0 aa, 1 am, 2 ae, 3 ma, 4 mm, 5 me, 6 ea, 7 em, 8 ee, 9 qq, 10 qt, 11 tq, 12 tt,
# 13 qm, 14 mq, 15 mt, 16 tm.
PAPER_NEGATIVES = (
    (1, 9, 13, 3, 14),
    (0, 2, 9, 10, 4),
    (1, 13, 10, 15, 5),
    (0, 9, 4, 6, 11),
    (9, 10, 11, 12, 3),
    (2, 4, 8, 10, 12),
    (3, 14, 7, 11, 16),
    (4, 6, 8, 11, 12),
    (15, 5, 7, 12, 16),
    (0, 1, 3, 4, 10),
    (1, 2, 9, 4, 5),
    (3, 4, 6, 7, 12),
    (4, 5, 7, 8, 11),
)


def normalize(x):
    """ẑ = z / sqrt(max(|z|², 1e-12)) along the last axis, in float64."""
    x = np.asarray(x, np.float64)
    return x / np.sqrt(np.maximum(np.sum(x * x, axis=-1, keepdims=True), 1e-12))


def pair_term(similarity_ab, negative_similarities):
    """ℓ(a, b) = -log(exp(s_ab) / (exp(s_ab) + Σ_k exp(s_ak))) for one positive pair."""
    numerator = np.exp(similarity_ab)
    denominator = numerator + sum(np.exp(s) for s in negative_similarities)
    return -np.log(numerator / denominator)


def nt_xent(z, positive_mask, negative_mask, temperature):
    """docs/METHOD.md §3: mean over positive pairs (a, b) of ℓ(a, b); 0 without positive pairs."""
    z_hat = normalize(z)
    num = len(z_hat)
    terms = []
    for a in range(num):
        for b in range(num):
            if not positive_mask[a][b]:
                continue
            s_ab = float(z_hat[a] @ z_hat[b]) / temperature
            negatives = [
                float(z_hat[a] @ z_hat[k]) / temperature for k in range(num) if negative_mask[a][k]
            ]
            terms.append(pair_term(s_ab, negatives))
    return float(np.mean(terms)) if terms else 0.0


def global_masks(strategy, sample_ids, partition_ids):
    """docs/METHOD.md §4 table, element by element."""
    num = len(sample_ids)
    positive = np.zeros((num, num), bool)
    negative = np.zeros((num, num), bool)
    for a in range(num):
        for b in range(num):
            same_sample = sample_ids[a] == sample_ids[b]
            same_partition = partition_ids[a] == partition_ids[b]
            if strategy == "GR":
                positive[a, b] = same_sample and a != b
                negative[a, b] = not same_sample
            elif strategy == "GD-":
                positive[a, b] = same_sample and a != b
                negative[a, b] = not same_partition
            elif strategy == "GD":
                positive[a, b] = same_partition and a != b
                negative[a, b] = not same_partition
            else:
                raise ValueError(strategy)
    return positive, negative


def global_loss(z, sample_ids, partition_ids, strategy, temperature):
    positive, negative = global_masks(strategy, sample_ids, partition_ids)
    return nt_xent(z, positive, negative, temperature)


def paper_positions(feature_size):
    """docs/METHOD.md §5 positions, spelled out: 13 anchors then (q,m) (m,q) (m,t) (t,m)."""
    w = feature_size - 4
    a, m, e, q, t = 0, w // 2, w, w // 4, (3 * w) // 4
    return [
        (a, a), (a, m), (a, e), (m, a), (m, m), (m, e), (e, a), (e, m), (e, e),
        (q, q), (q, t), (t, q), (t, t),
        (q, m), (m, q), (m, t), (t, m),
    ]  # fmt: skip


def local_loss(regions, sample_ids, partition_ids, strategy, temperature, negatives, num_anchors):
    """docs/METHOD.md §5: loop over anchor regions (v, j) and their positives (w, j).

    Group of a view: sample id (LR) or partition id (LD). Positives: same position, same group,
    other view. Negatives: "all": other position, same group, any view; "paper": the listed
    positions of j, in views v and w only.
    """
    z_hat = normalize(regions)
    groups = sample_ids if strategy == "LR" else partition_ids
    num_views, num_positions, _ = z_hat.shape

    def similarity(v, j, w, r):
        return float(z_hat[v, j] @ z_hat[w, r]) / temperature

    terms = []
    for v in range(num_views):
        for j in range(num_anchors):
            for w in range(num_views):
                if w == v or groups[w] != groups[v]:
                    continue
                if negatives == "all":
                    negative_regions = [
                        (u, r)
                        for u in range(num_views)
                        for r in range(num_positions)
                        if groups[u] == groups[v] and r != j
                    ]
                else:
                    negative_regions = [(u, r) for u in (v, w) for r in PAPER_NEGATIVES[j]]
                negative_similarities = [similarity(v, j, u, r) for u, r in negative_regions]
                terms.append(pair_term(similarity(v, j, w, j), negative_similarities))
    return float(np.mean(terms))


def original_local_loss(regions, temperature):
    """The original TF1 code's local loss (local_loss_exp_no=0), in numpy.

    Views come in consecutive pairs (2i, 2i+1) of one slice; for each of the 13 positions a term
    for each view of the pair, with the 5 listed negatives taken from both views. The original
    divides the sum by 13 (not by the number of terms; docs/METHOD.md §13 explains jaxcl's mean).
    """
    z_hat = normalize(regions)
    total = 0.0
    for first in range(0, len(z_hat), 2):
        pair = (first, first + 1)
        for j in range(13):
            for anchor, partner in (pair, pair[::-1]):
                positive = float(z_hat[anchor, j] @ z_hat[partner, j]) / temperature
                negatives = [
                    float(z_hat[anchor, j] @ z_hat[view, r]) / temperature
                    for r in PAPER_NEGATIVES[j]
                    for view in (anchor, partner)
                ]
                total += pair_term(positive, negatives)
    return total / 13
