"""The main job, SIGKILLed by itself at a chosen point of one checkpoint save (for ``test_main.py``).

``python tests/kill_during_save.py POINT STEP OVERRIDES...`` runs ``python -m vrag_rl.main OVERRIDES...`` and
kills the process when the save of step STEP reaches POINT:

- ``written``: every file of the checkpoint is written and flushed into its temporary folder, not yet renamed;
- ``committed``: the checkpoint is renamed into place, older ones not yet pruned, the export not yet written.
"""

import os
import runpy
import signal
import sys

import vrag_rl.job.checkpoint as checkpoint


def kill_at(point: str, step: int) -> None:
    name = checkpoint.CHECKPOINT.format(step)
    if point == "written":
        fsync_tree = checkpoint._fsync_tree

        def fsync_then_die(root):
            fsync_tree(root)
            if root.name == f".{name}.tmp":
                os.kill(os.getpid(), signal.SIGKILL)

        checkpoint._fsync_tree = fsync_then_die
    elif point == "committed":
        finished = checkpoint.finished_checkpoints

        def die_once_committed(out):
            if (out / "checkpoints" / name / "controller.json").is_file():
                os.kill(os.getpid(), signal.SIGKILL)
            return finished(out)

        checkpoint.finished_checkpoints = die_once_committed
    else:
        raise SystemExit(f"unknown kill point {point!r}")


if __name__ == "__main__":
    kill_at(sys.argv[1], int(sys.argv[2]))
    sys.argv = ["vrag_rl.main", *sys.argv[3:]]
    runpy.run_module("vrag_rl.main", run_name="__main__", alter_sys=True)  # as ``python -m`` runs it
