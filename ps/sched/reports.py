"""What workers report about their assignments (the `report` op), event by event.

Every report may carry `state.parts`, the progress of the partitions the
worker holds ({"3": {"from", "step", "loss", "accuracy", "max_staleness"}},
`from` being the step it started that partition at); progress counts only
for partitions the reporting worker holds in the current epoch. Events:

    plan         the initialising worker's model: state.tensors ([name,
                 shape, dtype] lists), state.nonlearned, state.train_size
                 (examples in the training set). Answered with the plan,
                 the shards and the steps each partition owes.
    initialized  the initialising worker created the tables: training starts.
    eval         test metrics a holder measured: state.step,
                 state.test_accuracy, state.test_loss.
    done         some partitions did all their steps (state.parts says so).
    release      state.release: partitions the worker gives back at a step
                 boundary, as the scheduler asked.
    stopped      the worker leaves the job (told to stop, or shutting down).
    failed       state.error; with state.fatal the job fails at once (a
                 diverged loss, a model too large, data that cannot be
                 read), else each partition it held counts a failure and
                 a partition failing max_failures times in a row fails the job.
    final        the final evaluation: state.test_accuracy, state.test_loss.

Every answer carries the worker's view after the event (`worker_view`):
the partitions it holds, those it should give back, whether to stop.
"""
from __future__ import annotations

import logging
import math

import numpy as np

from protocol.errors import ErrorCode, ProtocolError
from protocol.messages import Create, Ok
from protocol.partitions import schedule_length, steps_owed
from protocol.plan import make_plan
from ps.sched import checks
from ps.sched.events import CallShard, Reply
from ps.sched.jobs import MAX_HISTORY, JobRun

log = logging.getLogger("pscluster.scheduler")


# A handler's answer that comes later (Reports._answer_plan), not with the report's reply.
HELD = object()


class Reports:
    """Mixin of SchedulerState: the `report` op."""

    def on_report(self, req, out: list) -> None:
        msg, now = req.msg, req.now
        handler = {"plan": self._report_plan, "initialized": self._report_initialized, "eval": self._report_eval,
                   "done": self._report_done, "release": self._report_release, "stopped": self._report_stopped,
                   "failed": self._report_failed, "final": self._report_final}.get(msg.event)
        if handler is None:
            raise checks.bad(f"unknown report event {msg.event!r:.40} (known: plan, initialized, eval, done, "
                             "release, stopped, failed, final)", msg.rid)
        worker = self.workers.get(msg.worker)
        if worker is None:
            raise ProtocolError(ErrorCode.BAD_STATE, f"worker {msg.worker!r:.60} is not registered", rid=msg.rid)
        worker.last_seen = now
        run = self.runs.get(msg.job)
        if run is None:
            out.append(Reply(req.peer, Ok(rid=msg.rid, job=msg.job, body={"stop": True})))
            return
        if worker.job != run.job_id:
            raise self._not_yours(f"worker {msg.worker!r:.60} has no part in job {run.job_id} "
                                                      "(it was declared dead, or the job moved on)", rid=msg.rid)
        if run.progress(worker.id, checks.part_states(msg.state.get("parts"), msg.rid)):
            self._training_moved(run, now)
        body = handler(run, worker, msg, now, out) or {}
        self._settle(now, out)
        if body is HELD:  # answered later (the plan, once every shard created the tables)
            run.plan_wait = (req.peer, msg.rid, worker.id)
            self._answer_plan(run, out)
            return
        out.append(Reply(req.peer, Ok(rid=msg.rid, job=msg.job, body={**self.worker_view(worker, run.job_id),
                                                                      **body})))

    # --- the initialising worker ---

    def _report_plan(self, run: JobRun, worker, msg, now, out) -> dict:
        if run.init_worker != worker.id:
            raise self._not_yours(f"only the worker initialising job {run.job_id} sends its plan",
                                rid=msg.rid)
        tensors = checks.tensors(msg.state.get("tensors"), msg.rid)
        names = {name for name, _s, _d in tensors}
        nonlearned = msg.state.get("nonlearned", [])
        if not isinstance(nonlearned, list) or not all(isinstance(n, str) and n in names for n in nonlearned):
            raise checks.bad("state.nonlearned must list names of the model's tensors", msg.rid)
        size = msg.state.get("train_size")
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            raise checks.bad("state.train_size must be the number of training examples (>= 1)", msg.rid)
        nbytes = sum(math.prod(shape) * np.dtype(dtype).itemsize for _n, shape, dtype in tensors)
        if self.max_model_bytes and nbytes > self.max_model_bytes:
            self._fail(run, f"the model has {nbytes:,} bytes of parameters, over this scheduler's limit of "
                            f"{self.max_model_bytes:,} (--max-model-bytes)")
            return {"stop": True}
        try:
            plan = make_plan({n: (s, d) for n, s, d in tensors}, len(run.shards), run.spec["partition_bytes"])
        except (ValueError, ProtocolError) as exc:
            raise checks.bad(f"state.tensors: no plan can be made of them: {exc}", msg.rid) from None
        if run.plan is not None and run.plan.digest != plan.digest:
            raise ProtocolError(ErrorCode.BAD_PLAN, "this model's tensors differ from the job's plan", rid=msg.rid)
        source = self.jobs.get((run.spec.get("init_from") or "")[len("job:"):]) \
            if (run.spec.get("init_from") or "").startswith("job:") else None
        if source is not None and (source.plan or {}).get("digest") != plan.digest:
            self._fail(run, f"init_from: job {source.id} has other tensors or another shard count than this job "
                       f"(its plan differs): export it (psctl export) and start from the file instead")
            return {"stop": True}
        owed = steps_owed(run.spec, size)
        for p in run.partitions:
            if p.steps is None:
                p.steps = owed[p.index]
        if run.plan is None:
            run.plan = plan
            self._persist(out, run.record, plan=plan.to_wire(), nonlearned=list(nonlearned),
                          tensors=[[n, list(s), d] for n, s, d in tensors])
            self._note(run.job_id, "planned", f"{len(plan.tensors)} tensors, {nbytes:,} bytes, cut into "
                       f"{len(plan.slices)} slices over {plan.num_shards} shard(s)", slices=len(plan.slices),
                       bytes=nbytes)
        run.created.clear()
        for k in range(len(run.shards)):
            self._create_on(run, k, out)
        return HELD

    def _create_on(self, run: JobRun, k: int, out: list) -> None:
        """Ask shard k to create the job's table (the values come from the initialising worker: `load`)."""
        call = next(self._call_ids)
        self.calls[call] = ("create", run.job_id, k, 0)
        init = run.spec.get("init_from") or ""
        msg = Create(job=run.job_id, plan=run.plan.to_wire(),
                     optimizer=schedule_length(run.spec, [p.steps for p in run.partitions]),
                     policy=run.spec["consistency"], nonlearned=list(run.record.nonlearned),
                     checkpoint_every=int(run.spec.get("checkpoint_every") or 0),
                     init_from=init[len("job:"):] if init.startswith("job:") else "")
        out.append(CallShard(call, run.shards[k], msg, key=self._shard_key(k, run.shards[k])))

    def _created(self, run: JobRun, k: int, reply, out: list) -> None:
        """A shard's answer to a create: the plan is answered once every shard has the table."""
        if isinstance(reply, Ok):
            run.created.add(k)
            self._answer_plan(run, out)
        elif reply is None:
            self._create_on(run, k, out)   # unanswered after the tries: ask again
        else:
            self._fail(run, f"shard {k} cannot create the job's table: {reply.code}: {reply.message}")

    def _answer_plan(self, run: JobRun, out: list) -> None:
        if run.plan_wait is None or len(run.created) < len(run.shards):
            return
        peer, rid, worker = run.plan_wait
        run.plan_wait = None
        view = self.worker_view(self.workers[worker], run.job_id) if worker in self.workers else {}
        body = {**view, "plan": run.plan.to_wire(), "shards": run.shards, "steps": [p.steps for p in run.partitions]}
        out.append(Reply(peer, Ok(rid=rid, job=run.job_id, body=body)))

    def _report_initialized(self, run: JobRun, worker, msg, now, out) -> dict:
        if run.init_worker != worker.id or run.plan is None:
            raise self._not_yours(f"only the worker initialising job {run.job_id}, once it has "
                                                      "the plan, says the tables exist", rid=msg.rid)
        run.initialized = True
        if run.train_started is None:
            run.train_started = now
        return {}

    # --- training ---

    def _report_eval(self, run: JobRun, worker, msg, now, out) -> dict:
        if not run.held_by(worker.id):
            raise self._not_yours(f"worker {worker.id!r:.60} holds no partition of "
                                                      f"job {run.job_id}", rid=msg.rid)
        acc, loss, step = msg.state.get("test_accuracy"), msg.state.get("test_loss"), msg.state.get("step")
        if not isinstance(acc, (int, float)) or isinstance(acc, bool) or not 0.0 <= acc <= 1.0:
            raise checks.bad("state.test_accuracy must be a number in [0, 1]", msg.rid)
        loss = float(loss) if isinstance(loss, (int, float)) and not isinstance(loss, bool) else None
        run.test_accuracy, run.test_loss = float(acc), loss
        run.history.append({"step": step if isinstance(step, int) else None, "test_accuracy": float(acc),
                            "test_loss": loss, "t": round(now - run.started_at, 3)})
        del run.history[:-MAX_HISTORY]
        target = run.spec.get("target_accuracy")
        if target is not None and acc >= target and not run.stopping:
            run.stopping, run.stopped_by, run.target_seen = True, "target", float(acc)
            run.epoch += 1  # an empty membership freezes the parameters now
            self._note(run.job_id, "target_reached", f"test accuracy {acc:.4f} reached the target {target}: "
                       "training stops", test_accuracy=acc)
        return {}

    def _report_done(self, run: JobRun, worker, msg, now, out) -> dict:
        finished = [k for k in run.held_by(worker.id) if run.partitions[k].done]
        if finished:
            run.ungrant(finished)
            self._training_moved(run, now)
            self._note(run.job_id, "partitions_done", f"{worker.id} finished partitions "
                       f"{','.join(map(str, finished))}", worker=worker.id, partitions=finished)
        return {}

    def _report_release(self, run: JobRun, worker, msg, now, out) -> dict:
        given = checks.indices(msg.state.get("release"), len(run.partitions), msg.rid, "state.release")
        mine = set(run.held_by(worker.id))
        given = [k for k in given if k in mine]
        if given:
            run.ungrant(given)
            self._note(run.job_id, "released", f"{worker.id} gave back partitions {','.join(map(str, given))} "
                       "for a worker that joined", worker=worker.id, partitions=given)
        return {}

    def _report_stopped(self, run: JobRun, worker, msg, now, out) -> dict:
        self._leave(run, worker)
        return {"stop": True}

    def _report_failed(self, run: JobRun, worker, msg, now, out) -> dict:
        error = checks.error_text(msg.state.get("error"), "a worker failed without saying why")
        fatal = msg.state.get("fatal") is True
        if run.rollback is not None and run.eval_worker != worker.id and worker.job == run.job_id:
            # Its partitions were taken back for a rollback: what failed is the rollback's doing.
            self._leave(run, worker)
            return {"stop": True}
        if run.eval_worker != worker.id and not run.held_by(worker.id):
            raise self._not_yours(f"worker {worker.id!r:.60} holds no partition of job "
                                                      f"{run.job_id}: its failure is not the job's", rid=msg.rid)
        self._note(run.job_id, "worker_failed", f"{worker.id} failed{' (fatal)' if fatal else ''}: {error}",
                   level=logging.WARNING, worker=worker.id, fatal=fatal)
        if run.eval_worker == worker.id:
            run.eval_failures += 1
            if fatal or run.eval_failures >= self.max_failures:
                self._fail(run, f"the final evaluation failed: {error}")
        else:
            self._count_failures(run, run.held_by(worker.id), error, fatal=fatal)
        self._leave(run, worker)
        return {"stop": True}

    def _report_final(self, run: JobRun, worker, msg, now, out) -> dict:
        if run.eval_worker != worker.id:
            raise self._not_yours(f"worker {worker.id!r:.60} is not evaluating job {run.job_id}",
                                rid=msg.rid)
        acc, loss = msg.state.get("test_accuracy"), msg.state.get("test_loss")
        if not isinstance(acc, (int, float)) or isinstance(acc, bool) or not 0.0 <= acc <= 1.0:
            raise checks.bad("state.test_accuracy must be a number in [0, 1]", msg.rid)
        target = run.spec.get("target_accuracy")
        if run.stopped_by == "target" and acc < target and run.active():
            # The target was met by parameters one worker pulled; the frozen
            # ones (a few pushes later) fall short. Train on rather than end
            # below the target: the partitions resume where they stopped.
            self._note(run.job_id, "target_missed", f"the final evaluation's test accuracy {acc:.4f} is below "
                       f"the target {target}: training resumes", test_accuracy=acc)
            run.stopping, run.stopped_by, run.target_seen = False, "", None
            run.epoch += 1
        else:
            run.final = {"test_accuracy": float(acc),
                         "test_loss": float(loss) if isinstance(loss, (int, float)) else None}
        run.eval_worker, worker.job = None, None
        return {"stop": True}

    # --- shared ---

    def _not_yours(self, text: str, *, rid: int) -> ProtocolError:
        """A report about what the worker does not hold: FORBIDDEN when its key was authenticated
        (README.md, "Security"), NOT_MEMBER on a cluster without CURVE."""
        code = ErrorCode.FORBIDDEN if self.identity is not None else ErrorCode.NOT_MEMBER
        return ProtocolError(code, text, rid=rid)

    def _leave(self, run: JobRun, worker) -> None:
        """`worker` has no part in `run` any more; what it held goes back (no failure counted)."""
        held = run.held_by(worker.id)
        if held:
            run.ungrant(held)
        run.joining.discard(worker.id)
        if run.eval_worker == worker.id:
            run.eval_worker = None
        if run.init_worker == worker.id and not run.initialized:
            run.init_worker = None
        worker.job = None

    def _count_failures(self, run: JobRun, indices: list[int], error: str, *, fatal: bool = False) -> None:
        """Each partition in `indices` failed once more; max_failures in a row fail the job."""
        if fatal:
            self._fail(run, error)
            return
        for k in indices:
            p = run.partitions[k]
            p.failures += 1
            p.last_error = error
            if p.failures >= self.max_failures:
                self._fail(run, f"partition {k} failed {p.failures} times in a row; last error: {error}")
                return

    def _fail(self, run: JobRun, error: str) -> None:
        """The job fails with `error`: no more training; it ends once its workers have left."""
        if run.error:
            return
        self._note(run.job_id, "failing", f"the job fails: {error}", level=logging.ERROR)
        run.error, run.stopping, run.stopped_by = error, True, "error"
        run.epoch += 1

    def _training_moved(self, run: JobRun, now: float) -> None:
        if run.train_ended is None and all(p.done for p in run.partitions):
            run.train_ended = now
