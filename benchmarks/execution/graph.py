"""The one job graph every executor runs: per job, its training (after the training of the job it
starts from, `init_from`) and then its evaluations (after its own training). An executor walks
the nodes in this order, in process (SerialExecutor) or as Ray tasks whose object references
carry the weights from node to node (RayExecutor)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from fsbench.benchmarks.execution.driver import Driver
from fsbench.benchmarks.execution.planning import Job


@dataclass(frozen=True)
class Node:
    kind: str  # "train" | "eval"
    job: Job
    items: tuple = ()  # eval: the (cell, seed) items it scores
    needs: str | None = None  # the key of the job whose trained weights it takes


def job_graph(jobs: list[Job], eval_group: str = "model") -> list[Node]:
    """Nodes in an order where every node comes after the ones it needs (jobs keep the plan's
    order otherwise). `eval_group` "model": one evaluation per job; "seed": one per item."""
    by_key = {job.key: job for job in jobs}
    ordered, placed = [], set()

    def place(job: Job, path: tuple = ()) -> None:
        if job.key in placed:
            return
        if job.upstream in by_key and job.upstream not in path:
            place(by_key[job.upstream], (*path, job.key))
        placed.add(job.key)
        ordered.append(job)

    for job in jobs:
        place(job)
    nodes = []
    for job in ordered:
        if job.trainable:
            nodes.append(Node("train", job, needs=job.upstream))
        groups = [[item] for item in job.items] if eval_group == "seed" else [job.items]
        for group in groups:
            if group:
                nodes.append(Node("eval", job, tuple(group), job.key if job.trainable else None))
    return nodes


class Executor(Protocol):
    """What runs a plan: `start()` (connect, returns itself), `run(jobs, driver)` (the job
    graph, every output handed to the driver, one failed job never losing the others), and
    `stop()` (release what start took). SerialExecutor and RayExecutor implement it."""

    name: str

    def start(self) -> Executor: ...

    def run(self, jobs: list[Job], driver: Driver) -> None: ...

    def stop(self) -> None: ...
