"""Splitting a training set over federated clients: IID, Dirichlet over labels (non-IID), or whole documents.

`iid` and `dirichlet` are flwr-datasets' `IidPartitioner` and `DirichletPartitioner` run on an in-memory
`datasets.Dataset` of item indices (nothing is downloaded). `IidPartitioner` cuts contiguous shards, so the indices
are shuffled with the seed first. `DirichletPartitioner` draws each class's share per client from Dir(alpha): the
smaller alpha, the more each client sees of one class only; it redraws (up to 10 times) until every client has at
least one item, and a split that still leaves a client empty is a one-line error. `by-document` gives each client
whole documents (a play, a file), balanced by size: flwr-datasets' `GroupedNaturalIdPartitioner` balances the
number of documents, not their sizes, so the greedy largest-first assignment is written here.
"""

from __future__ import annotations

import warnings

import numpy as np

from llmkit.errors import ConfigError, DataError

SCHEMES = ("iid", "dirichlet", "by-document")


def partition(n_items: int, n_clients: int, scheme: str, *, labels: list[int] | None = None,
              groups: list[int] | None = None, alpha: float = 0.5, seed: int = 0) -> list[list[int]]:
    """Item indices per client: disjoint, covering all `n_items`, each client non-empty, the same for a seed."""
    if scheme not in SCHEMES:
        raise ConfigError(f"federated.split: unknown scheme {scheme!r} (valid: {', '.join(SCHEMES)})")
    if n_clients < 1:
        raise ConfigError(f"federated.clients: {n_clients} (need at least 1 client)")
    if scheme == "dirichlet" and not alpha > 0:
        raise ConfigError(f"federated.alpha: {alpha} (the Dirichlet concentration must be > 0; e.g. 0.3 is "
                          "strongly non-IID, 100 nearly IID)")
    if n_items < n_clients:
        raise DataError(f"{n_clients} clients but only {n_items} training examples: every client needs at least "
                        "one; lower --clients or add data")
    if scheme == "iid":
        return _iid(n_items, n_clients, seed)
    if scheme == "dirichlet":
        if labels is None or len(labels) != n_items:
            raise ConfigError("federated.split dirichlet splits over class labels: it needs --task classify")
        return _dirichlet(labels, n_clients, alpha, seed)
    if groups is None or len(groups) != n_items:
        raise ConfigError("federated.split by-document needs documents (--task lm on a corpus or text files)")
    return _by_document(groups, n_clients, seed)


def _iid(n_items: int, n_clients: int, seed: int) -> list[list[int]]:
    from datasets import Dataset
    from flwr_datasets.partitioner import IidPartitioner

    part = IidPartitioner(num_partitions=n_clients)
    part.dataset = Dataset.from_dict({"idx": np.random.default_rng(seed).permutation(n_items)})
    return [list(part.load_partition(c)["idx"]) for c in range(n_clients)]


def _dirichlet(labels: list[int], n_clients: int, alpha: float, seed: int) -> list[list[int]]:
    from datasets import Dataset
    from flwr_datasets.partitioner import DirichletPartitioner

    part = DirichletPartitioner(num_partitions=n_clients, partition_by="label", alpha=float(alpha),
                                min_partition_size=1, self_balancing=False, shuffle=True, seed=seed)
    part.dataset = Dataset.from_dict({"label": list(labels), "idx": list(range(len(labels)))})
    try:
        with warnings.catch_warnings():  # it warns on every redraw; the error below says it plainly
            warnings.simplefilter("ignore")
            return [list(part.load_partition(c)["idx"]) for c in range(n_clients)]
    except ValueError:
        raise DataError(f"a Dirichlet split with alpha {alpha} left a client without examples in 10 draws "
                        f"({len(labels)} examples, {n_clients} clients); raise --alpha or lower --clients") from None


def _by_document(groups: list[int], n_clients: int, seed: int) -> list[list[int]]:
    docs: dict[int, list[int]] = {}
    for i, g in enumerate(groups):
        docs.setdefault(g, []).append(i)
    if len(docs) < n_clients:
        raise DataError(f"{n_clients} clients but only {len(docs)} documents: by-document gives each client whole "
                        "documents; lower --clients or add documents")
    ids = list(docs)
    order = np.random.default_rng(seed).permutation(len(ids))  # ties between equal sizes broken by the seed
    ranked = sorted((ids[i] for i in order), key=lambda g: -len(docs[g]))
    loads, out = [0] * n_clients, [[] for _ in range(n_clients)]  # type: list[int], list[list[int]]
    for g in ranked:  # largest document first, to the least-loaded client
        c = min(range(n_clients), key=lambda k: (loads[k], k))
        out[c].extend(docs[g])
        loads[c] += len(docs[g])
    return out
