"""Orchestration: starting, supervising and stopping runs (the contract they keep is in docs/design.md).

launch (the one way to start a run), worker (a detached run's own process), distributed, supervise, torchrun and rank
(several processes as one run), stop (graceful stops), gpu_queue (a run's turn on its GPUs), tasks (predict and
export started as processes). What they write and read is ``engine.rundir``'s.
"""
