"""Server side of pscluster: the shard and the scheduler daemons, consistency
policies, server-side optimizers and checkpoints.

Imports `protocol` only; never `worker` (they meet through the protocol).
`ps.cli` hosts the `psctl` command group and the server-side commands; the
worker-side commands plug into it by name (setup.cfg entry points).
"""
