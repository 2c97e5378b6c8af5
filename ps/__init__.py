"""Server side of pscluster: the shard and the scheduler daemons, consistency
policies, server-side optimizers and checkpoints.

Imports `protocol` only; never `worker` (they meet through the protocol).
The one exception is `ps.cli`, the command line, which wires both sides
together and imports `worker` lazily inside its commands.
"""
