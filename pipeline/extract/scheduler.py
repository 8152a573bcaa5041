"""The driver's loop: shards through decode tasks -> teacher actors -> writer tasks, in dataset order, with
bounded queues (back-pressure), leases (two jobs on one store never compute a shard twice), retries, and the
commit of each shard's record, which only this process makes."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import replace

from pipeline.extract.actors import decode_task, write_task
from pipeline.extract.compute import batches_of
from pipeline.extract.plan import Plan
from pipeline.extract.resources import Resources
from store import ShardRecord, StoreWriter


class NodeWatch:
    """The cluster's nodes, looked at once every `every` seconds: a node that leaves (killed, preempted, its
    raylet dead) is one line, not silence while Ray retries its tasks and restarts its actors on the others."""

    def __init__(self, ray, every: float = 1.0, clock: Callable[[], float] = time.monotonic):
        self.ray, self.every, self.clock = ray, every, clock
        self.alive = self._alive()
        self.next = clock() + every

    def _alive(self) -> dict[str, str]:
        try:
            return {n["NodeID"]: n.get("NodeManagerAddress", "?") for n in self.ray.nodes() if n.get("Alive")}
        except Exception:  # the GCS busy or restarting: look again next time
            return getattr(self, "alive", {})

    def lost(self, now: bool = False) -> list[str]:
        """Lines for the nodes gone since the last look (`now`: look even if it is not time yet)."""
        if self.clock() < self.next and not now:
            return []
        self.next = self.clock() + self.every
        alive = self._alive()
        gone = [f"node {addr} ({node[:12]}) left the cluster: Ray retries its tasks and restarts its actors on the "
                f"{len(alive)} node(s) left; shards already committed are kept" for node, addr in self.alive.items()
                if node not in alive]
        self.alive = alive
        return gone


class ShardScheduler:
    """`run()` computes and commits every shard of `work` ({shard: tasks}); afterwards `done` holds the records
    committed, `failed` the shards that kept failing (with why), `by_others` those another job committed."""

    def __init__(self, ray, writer: StoreWriter, plan: Plan, work: dict[int, tuple[str, ...]], actors: list,
                 specs: dict, res: Resources, *, records: dict[int, ShardRecord], decode_cpus: float,
                 max_pixels: int, retries: int, bar, on_commit: Callable[[ShardScheduler], None] = lambda s: None,
                 poll: float = 1.0, committed: set[int] = frozenset()):
        """`records`: the store's records when the run began (a shard whose record changes since was committed by
        another job); `committed`: those of them whose files verified, so that a shard gaining tasks computes
        from the images its tar holds, not from the input again; `on_commit` runs after each commit (the run's
        progress); `poll`: seconds between looks at shards another job holds."""
        self.ray, self.writer, self.plan, self.work, self.actors = ray, writer, plan, work, actors
        self.specs, self.res, self.max_pixels, self.retries, self.bar = specs, res, max_pixels, retries, bar
        self.records_at_start, self.on_commit, self.poll = records, on_commit, poll
        self.committed = committed
        self.decode = ray.remote(num_cpus=decode_cpus, max_retries=3)(decode_task).options(num_returns=2)
        self.write = ray.remote(num_cpus=min(1.0, decode_cpus), max_retries=3)(write_task)  # mostly I/O
        self.queue = deque(sorted(work))
        self.attempts = dict.fromkeys(work, 0)
        self.failed: dict[int, str] = {}
        self.done: dict[int, ShardRecord] = {}
        self.by_others: set[int] = set()
        self.inflight: dict = {}  # teacher ref -> (actor, samples)
        self.load = [0] * len(actors)
        self.writers: dict = {}  # writer ref -> shard
        self.previous: dict[int, ShardRecord | None] = {}  # shard -> the record it had before this run redid it
        self.leases = writer.leases()
        self.deferred: dict[int, str] = {}  # shard -> the job holding its lease
        self.said_waiting = False
        self.nodes = NodeWatch(ray)

    def run(self) -> None:
        try:
            while self.queue or self.inflight or self.writers or self.deferred:
                while self.queue and len(self.writers) < self.res.max_writers and \
                        min(self.load, default=0) < self.res.prefetch:
                    self._submit(self.queue.popleft())
                self.leases.renew_due()
                for line in self.nodes.lost():
                    print(line, flush=True)
                if self.queue or self.inflight or self.writers:
                    self._collect()
                else:  # only shards another job holds are left: wait for them
                    self._wait_for_others()
            for line in self.nodes.lost(now=True):
                print(line, flush=True)
        finally:
            self.leases.release_all()  # stopped or failed: hand the shards back at once rather than at expiry

    # ---- one shard ----------------------------------------------------------------------------------------------
    def _done_by_another_job(self, i: int) -> bool:
        rec = self.writer.record(i)  # a record that was not there (or not this one) when this run began
        before = self.records_at_start.get(i)
        fresh = rec is not None and (before is None or rec.to_dict() != before.to_dict())
        return fresh and set(self.work[i]) <= set(rec.tasks)

    def _by_another(self, i: int) -> None:
        self.by_others.add(i)
        self.bar.update(self.plan.shard_count(i))

    def _claim(self, i: int) -> bool:
        if i in self.leases.held:
            return True
        if not self.leases.take(i):
            self.deferred[i] = (self.leases.holder(i) or {}).get("owner", "another job")
            return False
        if self._done_by_another_job(i):  # it committed the shard and let go of it before this run got here
            self.leases.release(i)
            self._by_another(i)
            return False
        return True

    def _submit(self, i: int) -> None:
        if not self._claim(i):
            return
        tasks, metas, targets = self.work[i], [], []
        for chunk in batches_of(self._records(i), self.res.batch):
            pix, meta = self.decode.remote(chunk, [self.specs[t] for t in tasks], self.max_pixels, self.res.resize_on)
            metas.append(meta)
            if not tasks:  # images, captions and ids only: no teacher, the decoded batch goes to the writer
                continue
            a = min(range(len(self.actors)), key=self.load.__getitem__)
            ref = self.actors[a].run.remote(pix, list(tasks))
            self.inflight[ref] = (a, len(chunk))
            self.load[a] += 1
            targets.append(ref)
        if i not in self.previous:  # a shard being redone is not done meanwhile (a damaged record goes too);
            self.previous[i] = self.writer.redo(i)  # a retry keeps what the first attempt found
        self.writers[self.write.remote(self.writer, i, tasks, self.previous[i], metas, targets,
                                       i in self.committed)] = i
        self.attempts[i] += 1

    def _records(self, i: int) -> list:
        """The shard's records; those of a committed shard that gains tasks name their sample in its tar, whose
        image the decode reads (never a committed image replaced by what the input holds now)."""
        records = self.plan.shard_records(i)
        rec = self.records_at_start.get(i) if i in self.committed else None
        ranges = rec.sample_ranges() if rec is not None else None
        if ranges is None or rec.ids is None or len(ranges) != len(records):
            return records
        url = self.writer.loc.url
        return [replace(r, at=("store", url, i, *ranges[p])) for p, r in enumerate(records)]

    def _collect(self) -> None:
        ready, _ = self.ray.wait(list(self.inflight) + list(self.writers), num_returns=1, timeout=1.0,
                                 fetch_local=False)
        for ref in ready:
            if ref in self.inflight:
                a, n = self.inflight.pop(ref)
                self.load[a] -= 1
                self.bar.update(n)
            else:
                self._commit(self.writers.pop(ref), ref)

    def _commit(self, i: int, ref) -> None:
        try:
            rec = self.ray.get(ref)
            self.writer.commit(rec)
        except Exception as e:  # the write or the commit failed even after Ray's retries
            reason = f"{type(e).__name__}: {str(getattr(e, 'cause', None) or e)[:400]}"
            if self.attempts[i] <= self.retries:
                print(f"shard {i} failed ({reason}); retrying", flush=True)
                self.queue.append(i)
                if self.work[i]:  # the teacher step counted its images
                    self.bar.update(-self.plan.shard_count(i))
            else:
                self.failed[i] = reason
                self.leases.release(i)
                print(f"shard {i} FAILED after {self.attempts[i]} attempts: {reason}", flush=True)
            return
        self.leases.release(i)
        self.done[i] = rec
        if not self.work[i]:  # no teacher step counted its images
            self.bar.update(rec.count)
        bad = sum(r.bad_images for r in self.done.values())
        self.bar.set_postfix(shards=f"{len(self.done)}/{len(self.work)}", bad=bad, failed=len(self.failed),
                             refresh=False)
        self.on_commit(self)

    def _wait_for_others(self) -> None:
        if not self.said_waiting:
            print(f"waiting for {len(self.deferred)} shard(s) that another job is computing "
                  f"({', '.join(sorted(set(self.deferred.values())))}); if that job is gone: python -m "
                  f"pipeline.inspect {self.writer.loc} unlease N --force (`summary` lists the leases)", flush=True)
            self.said_waiting = True
        time.sleep(self.poll)
        for i in list(self.deferred):
            if self._done_by_another_job(i):
                self.deferred.pop(i)
                self._by_another(i)
            elif self.leases.holder(i) is None:  # it gave the shard up (failed, stopped): ours now
                self.deferred.pop(i)
                self.queue.append(i)
