"""What `psctl` shows people: live progress lines, job summaries, status and list views, loss plots.

Pure rendering of the scheduler's and the trainer's answers onto a stream
(or a PNG, when matplotlib is installed); the commands in worker/cli call
these and print.
"""
