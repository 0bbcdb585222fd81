"""examples/train.py run as ``__main__`` with a tracker-like ``report_to`` integration and a user's atexit flush, to
test how a run leaves (tests/test_examples.py). Arguments are train.py's.

``--report_to exit_probe`` selects `ExitProbeCallback`, registered the way transformers registers its integrations.
Like wandb's, it buffers what it logs and finishes its run in an atexit handler: if the process leaves without
running atexit handlers, its file stays empty. A second atexit handler writes a marker, as a user's own flush would.
Each rank writes into ``<output_dir>/exit_probe/``.
"""

import atexit
import os
import runpy
import sys
from pathlib import Path

from transformers import TrainerCallback
from transformers.integrations import integration_utils

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


class ExitProbeCallback(TrainerCallback):
    """Logs every step to a buffered file, notes ``on_train_end``, and finishes (flushes and closes) at exit."""

    def __init__(self):
        self.run = None

    def on_train_begin(self, args, state, control, **kwargs):
        folder = Path(args.output_dir) / "exit_probe"
        folder.mkdir(parents=True, exist_ok=True)
        self.run = open(folder / f"run-{os.environ.get('RANK', '0')}.log", "w", buffering=1 << 20, encoding="utf-8")
        atexit.register(self.finish)

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.run.write(f"log step {state.global_step}\n")

    def on_train_end(self, args, state, control, **kwargs):
        self.run.write("on_train_end\n")

    def finish(self):
        self.run.write("finished\n")
        self.run.close()


def write_exit_marker(output_dir: str) -> None:
    folder = Path(output_dir) / "exit_probe"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"atexit-{os.environ.get('RANK', '0')}").write_text("flushed\n", encoding="utf-8")


if __name__ == "__main__":
    integration_utils.INTEGRATION_TO_CALLBACK["exit_probe"] = ExitProbeCallback
    atexit.register(write_exit_marker, sys.argv[sys.argv.index("--output_dir") + 1])
    sys.argv[0] = str(EXAMPLES / "train.py")
    runpy.run_path(sys.argv[0], run_name="__main__")
