"""The main job, SIGKILLed by itself once a checkpoint is committed (for ``test_main.py``).

``python tests/kill_during_save.py STEP OVERRIDES...`` runs ``python -m vrag_rl.main OVERRIDES...`` and kills the
process when the checkpoint of step STEP is renamed into place, before older ones are pruned and before the
export is written.
"""

import os
import runpy
import signal
import sys

import vrag_rl.job.checkpoint as checkpoint


def kill_once_committed(step: int) -> None:
    name = checkpoint.CHECKPOINT.format(step)
    finished = checkpoint.finished_checkpoints

    def die_once_committed(out):
        if (out / "checkpoints" / name / "controller.json").is_file():
            os.kill(os.getpid(), signal.SIGKILL)
        return finished(out)

    checkpoint.finished_checkpoints = die_once_committed


if __name__ == "__main__":
    kill_once_committed(int(sys.argv[1]))
    sys.argv = ["vrag_rl.main", *sys.argv[2:]]
    runpy.run_module("vrag_rl.main", run_name="__main__", alter_sys=True)  # as ``python -m`` runs it
