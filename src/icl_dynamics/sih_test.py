"""The significance test behind the SIH flag: a mean of per-event differences, clustered two ways.

A cell's events (every qualifying (triplet, query) of one head, relation, direction, gate and variant)
are not independent draws: events of one abstract share its context, and events of one token pair
(t_s, t_o) share the pair's random-init OV preference. :func:`clustered_test` gives the event mean, a
multi-way cluster-robust standard error and a one-sided p-value; :func:`holm` controls the family-wise
error over the cells of a checkpoint.

**Why CR2 with Bell-McCaffrey degrees of freedom, not CR1.** Events are weighted equally, so a cluster
holding most of a cell's events (one long abstract that a selective head keeps attending to) dominates
both the mean and its variance. With the usual CR1 estimator and G - 1 degrees of freedom the test then
over-rejects badly: in a null simulation with cluster effects N(0, 1) and one of 10 clusters holding
90 % of the events, P(p < 1e-3) was 0.34 (tests/test_sih_test.py), and with 30 clusters of which 5
hold 80 % of the events (Kish effective count 10.7) P(p < 1e-5) was 55 times its nominal level. The
bias-reduced estimator CR2 (Bell & McCaffrey 2002) scales each cluster's residual sum by
``(1 - n_g / N) ** -1/2`` (its leverage in the intercept-only regression), and its t statistic is referred
to Student's t with the Bell-McCaffrey degrees of freedom ``(tr M)^2 / tr(M^2)`` (working independence),
which fall towards 1 as one cluster dominates. In the same simulations it stayed near or below nominal
from 1e-3 to 1e-5 (ratios 0.6-1.8; 0 of 4,000 null cells below 1e-3 with one cluster holding 90 %),
though not at the 5 % level there (10.7 %, CR1 46 %), which Holm over a checkpoint's cells never
uses; with balanced clusters it *is* CR1 with G - 1 degrees of freedom
(same variance, same degrees of freedom), so no power is lost there. A wild cluster bootstrap was
the alternative; its p-values at the 1e-5 level Holm needs over thousands of cells would cost 10^5
resamples per cell and checkpoint. Pustejovsky & Tipton (2018) discuss CR2 with few or unbalanced
clusters; ours is their intercept-only special case, in closed form (statsmodels has only CR1-type
cluster covariances; R's clubSandwich has CR2, and tests/test_sih_test.py checks ours against the
matrix definition).

Two cluster dimensions: the variance is the sum of each dimension's CR2 variance (Cameron, Gelbach &
Miller 2011 without subtracting the intersection term, which is never negative, so the sum errs on
the safe side) and the degrees of freedom the smaller of the two dimensions' (Satterthwaite's
combination of the two would be at least that).

**Effective clusters.** Besides the nominal count, each dimension's Kish effective number of clusters
``(sum n_g)^2 / sum n_g^2`` is returned: ten clusters of which one holds 90 % of the events are
about 1.2 effective clusters. The relation index reports it beside the nominal count, which is what its
``min_clusters`` rule reads: CR2 with Bell-McCaffrey degrees of freedom already stays calibrated with
few effective clusters (its degrees of freedom fall with them), so a second gate would only cost power
on the unbalanced cells that real abstracts give (a hand-built perfect head over 12 documents of 4-14
events each has 8.9 effective documents).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import stats

ClusterDim = tuple[np.ndarray, np.ndarray, np.ndarray, int]
"""(keys = cell * n_clusters + cluster, sum of the events' values, count of events, n_clusters)."""


def clustered_test(dims: Sequence[ClusterDim], n_cells: int) -> dict[str, np.ndarray]:
    """Mean of per-event values per cell, its multi-way CR2 standard error and a one-sided p (mean > 0).

    ``dims`` holds one ``(keys, sums, counts, n_clusters)`` per cluster dimension, ``keys`` = cell *
    n_clusters + cluster with the sum and count of the events behind each (repeats allowed, summed);
    every dimension covers the same events. Returns per cell: ``mean``, ``se``, ``p`` (Student's t with
    ``df``), ``df`` (the smallest Bell-McCaffrey degrees of freedom over the dimensions), ``clusters``
    (the smallest nominal cluster count), ``effective_clusters`` (the smallest Kish count) and
    ``events``. ``se`` and ``p`` are NaN below 2 clusters (see the module docstring).
    """
    if not dims:
        raise ValueError("clustered_test needs at least one cluster dimension")
    variance = np.zeros(n_cells)
    df = np.full(n_cells, np.inf)
    clusters = np.full(n_cells, np.inf)
    effective = np.full(n_cells, np.inf)
    for keys, sums, counts, n_clusters in dims:
        uniq, inverse = np.unique(keys, return_inverse=True)
        s_g = np.bincount(inverse, weights=sums, minlength=len(uniq))
        n_g = np.bincount(inverse, weights=counts, minlength=len(uniq))
        cell = uniq // n_clusters

        def per_cell(values: np.ndarray, cell: np.ndarray = cell) -> np.ndarray:
            return np.bincount(cell, weights=values, minlength=n_cells)

        events, total = per_cell(n_g).astype(float), per_cell(s_g).astype(float)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = total / events
            big_n = events[cell]
            # CR2: each cluster's residual sum scaled by (1 - leverage)^(-1/2), leverage n_g / N
            variance += per_cell((s_g - n_g * mean[cell]) ** 2 / (1 - n_g / big_n)) / events**2
            # Bell-McCaffrey: M = D_c (diag(n) - n n' / N) D_c, c_g^2 = 1 / (N (N - n_g)); tr M = 1 / N
            a = n_g**2 / (big_n**2 * (big_n - n_g))
            trace_m2 = per_cell(n_g**2) / events**4 + per_cell(a) ** 2 - per_cell(a**2)
            df = np.minimum(df, events**-2 / trace_m2)
            effective = np.minimum(effective, events**2 / per_cell(n_g**2))
        clusters = np.minimum(clusters, np.bincount(cell, minlength=n_cells).astype(float))
    few = clusters < 2
    with np.errstate(invalid="ignore", divide="ignore"):
        se = np.sqrt(variance)
        t = mean / se
        p = np.where(se > 0, stats.t.sf(t, np.where(few, 1.0, df)), np.where(mean > 0, 0.0, 1.0))
    se[few], p[few], df[few] = np.nan, np.nan, np.nan
    effective = np.nan_to_num(effective, nan=0.0, posinf=0.0)  # a cell without events has none
    return {"mean": mean, "se": se, "p": p, "df": df, "clusters": clusters, "effective_clusters": effective,
            "events": events}


def holm(p: np.ndarray) -> np.ndarray:
    """Holm's step-down adjusted p-values (family-wise error control); NaN entries are not tested."""
    flat = np.asarray(p, dtype=float).ravel()
    out = np.full(flat.shape, np.nan)
    tested = np.flatnonzero(~np.isnan(flat))
    order = tested[np.argsort(flat[tested], kind="stable")]
    m = len(order)
    scaled = np.minimum(1.0, (m - np.arange(m)) * flat[order])
    out[order] = np.maximum.accumulate(scaled) if m else scaled
    return out.reshape(np.shape(p))
