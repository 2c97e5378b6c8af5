"""Data loading for workers: datasets by index, partitions, deterministic batches.

    train, test = load_dataset(spec["data"], seed=spec["seed"])
    batches = worker_batches(train, k=k, num=spec["workers"],
                             batch_size=spec["data"]["batch_size"], seed=spec["seed"])
    x, y = batches.batch(step)

Sources: sklearn:digits (vendored, no scikit-learn), idx:DIR (MNIST),
npz:PATH, synthetic:n=N,... (lazy, any size). Errors are DataError, one
sentence each. A worker passes `roots=` (its --data-root directories): idx:
and npz: paths outside them are refused before anything is opened
(worker/data/roots.py). Pure numpy; nothing here imports `ps` or touches a
socket.
"""
from worker.data.base import ArrayDataset, DataError, Dataset
from worker.data.batches import Batches, partition, worker_batches
from worker.data.idx import read_idx, write_idx
from worker.data.roots import check_roots, roots_from_env
from worker.data.sources import load_dataset, load_digits, parse_source
from worker.data.synthetic import SyntheticDataset

__all__ = [
    "ArrayDataset", "Batches", "DataError", "Dataset", "SyntheticDataset", "check_roots",
    "load_dataset", "load_digits", "parse_source", "partition", "read_idx", "roots_from_env",
    "worker_batches", "write_idx",
]
