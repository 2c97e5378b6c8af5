"""The worker side of `psctl`: the worker daemon and every user command.

These commands are plugged into `psctl` (ps/cli) through the entry-point
groups `psctl.commands` and `psctl.bench` declared in setup.cfg, so neither
package imports the other: ps/cli hosts the command group, this package
brings the commands that need worker code (parameter and scheduler
clients, the backprop library, data). Only click wrappers live here: they
parse, call and print. The benchmarks are in worker/bench, the local
processes of `psctl run` in worker/local_cluster.py, what people are shown
in worker/views; nothing here opens a socket. Heavy imports stay inside the
command functions, so `psctl --help` loads none of them.
"""
