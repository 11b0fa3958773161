"""The bottom floor: the on-disk contract (schemas, atomic writes, dataset, candidates, teacher
cache) and pure helpers (metrics, ranking agreement, search, tracking). It imports nothing else of
cprd, so every other floor can rely on it."""
