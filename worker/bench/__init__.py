"""The benchmarks behind `psctl bench` (the commands in worker/cli only parse and print).

- pushpull.py: push, pull and push_pull through real shard processes against
  raw pyzmq request/reply of the same bytes (raw_echo.py: the echo server and
  its client, the one socket owner here) and against the work floor;
- nn.py: train_step throughput of the backprop library against numpy's matmul;
- consistency.py: one job under BSP, SSP(s) and ASP with a straggler;
- checkpoint_bench.py: what checkpointing costs a job's steps;
- scale.py: a wide MLP of a given size on S shards and W workers: each
  process's peak memory against the bytes it holds, cold and warm push_pull
  against raw pyzmq;
- overlap.py: examples/s of one job with communication overlapped with
  backprop and without, alternating on one cluster.

The processes they start are worker/local_cluster.py's. Each module's top
level imports only the standard library, protocol/ and that; numpy and the
clients load inside the functions, except nn.py and raw_echo.py, which are
numpy through and through.
"""
