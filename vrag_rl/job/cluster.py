"""The run's view of a multi-node Ray cluster: which interface gloo uses, and nodes lost mid-run.

A node that leaves the cluster mid-run takes its trainer rank with it, and a collective or a rollout batch
waiting on that rank would wait for ever. ``NodeWatch`` (a context manager around the run) polls Ray's node
table from a thread of the controller; when a node that was alive at the start is dead, it names the node and
ends the controller process at once (exit status ``NODE_LOST_EXIT``), also when the run failed on the lost node
before Ray declared it dead: checkpoints are committed atomically, so the job's resubmission resumes from the
last one.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

NODE_LOST_EXIT = 3


def node_name(node: dict) -> str:
    return f"{node.get('NodeManagerHostname', '?')} ({node.get('NodeManagerAddress', '?')})"


class NodeWatch:
    """Polls ``list_nodes`` (``ray.nodes``) every ``interval_s``; ``on_lost(message)`` when a node is lost."""

    def __init__(
        self,
        list_nodes: Callable[[], list[dict]] | None = None,
        interval_s: float = 2.0,
        on_lost: Callable[[str], None] | None = None,
        settle_s: float = 90.0,
    ):
        import ray

        self.list_nodes = list_nodes or ray.nodes
        self.interval_s, self.settle_s = interval_s, settle_s
        self.on_lost = on_lost or _exit_naming
        self.started = {n["NodeID"]: node_name(n) for n in self.list_nodes() if n["Alive"]}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="node-watch", daemon=True)

    def lost(self) -> list[str]:
        """The nodes alive when the watch began that are dead or gone now."""
        alive = {n["NodeID"] for n in self.list_nodes() if n["Alive"]}
        return [name for node_id, name in self.started.items() if node_id not in alive]

    def message(self, lost: list[str]) -> str:
        return (
            f"vrag-rl: lost {len(lost)} of {len(self.started)} Ray node(s) mid-run: {', '.join(lost)}. Stopping; "
            "resubmit the job to resume from its last checkpoint"
        )

    def __enter__(self) -> NodeWatch:
        self._thread.start()
        return self

    def __exit__(self, kind, err, tb) -> None:
        """Stops the watch; an error raised meanwhile is reported as the node it came from when a node is lost.

        A peer's closed connection or a dead actor can surface before Ray declares the node dead (~40 s of
        missed health checks), so after an error of Ray's the table is read again for up to ``settle_s``."""
        import ray

        self._stop.set()
        self._thread.join()
        if not isinstance(err, Exception):
            return
        deadline = time.monotonic() + (self.settle_s if isinstance(err, ray.exceptions.RayError) else 0)
        while not (lost := self.lost()) and time.monotonic() < deadline:
            time.sleep(self.interval_s)
        if lost:
            self.on_lost(self.message(lost))

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                lost = self.lost()
            except Exception as err:  # the head itself gone: Ray's own errors end the controller
                log.warning("node watch: cannot read the node table (%s)", err)
                continue
            if lost and not self._stop.is_set():
                self.on_lost(self.message(lost))
                return


def _exit_naming(message: str) -> None:
    log.error(message)
    print(message, file=sys.stderr, flush=True)
    os._exit(NODE_LOST_EXIT)  # from a thread: the main thread may be blocked in a call to the lost node
