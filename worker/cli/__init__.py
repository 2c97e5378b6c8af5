"""The worker side of `psctl`: the worker daemon and every user command.

These commands are plugged into `psctl` (ps/cli) through the entry-point
groups `psctl.commands` and `psctl.bench` declared in setup.cfg, so neither
package imports the other: ps/cli hosts the command group, this package
brings the commands that need worker code (parameter and scheduler
clients, the backprop library, data). Heavy imports stay inside the
command functions, so `psctl --help` loads none of them.
"""
