"""`surgical_peft.cli.main(sys.argv[1:])` in a process that kills itself at a chosen point: what the resume tests run.

Environment (unset: no kill):
    KILL_AFTER_STEPS=N      kill right after this process's N-th optimizer step;
    KILL_AT=module:function kill when `module.function` is called for the KILL_AT_CALL-th time (default 1), before
                            it runs, e.g. `surgical_peft.training.checkpoint:_mark_complete`, or
                            `accelerate.checkpointing:save` (a checkpoint half-written);
    KILL_SIGNAL=KILL|INT    the signal (default KILL; INT is Ctrl-C).

Run it directly or under `accelerate launch`; every process kills itself at the same point.
"""

from __future__ import annotations

import functools
import importlib
import os
import signal
import sys
from typing import Any

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook


def _kill() -> None:
    sys.stdout.flush()
    # `raise_signal` sends the signal to this thread, and Python runs its handler before the call returns: Ctrl-C's
    # KeyboardInterrupt comes out of the hook itself. (`os.kill(os.getpid(), ...)` sends it to the process, where
    # another thread, tqdm's or torch's, may take it; Python then raises it wherever the main thread is by then.)
    signal.raise_signal(getattr(signal, f"SIG{os.environ.get('KILL_SIGNAL', 'KILL')}"))


def _after_steps(steps: int) -> None:
    done = 0

    def count(*_: Any) -> None:
        nonlocal done
        done += 1
        if done == steps:
            _kill()

    register_optimizer_step_post_hook(count)


def _at_call(target: str, call: int) -> None:
    module_name, name = target.split(":")
    module = importlib.import_module(module_name)
    original = getattr(module, name)
    calls = 0

    @functools.wraps(original)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == call:
            _kill()
        return original(*args, **kwargs)

    setattr(module, name, wrapper)


if __name__ == "__main__":
    torch.set_num_threads(1)
    # Ctrl-C as a terminal's foreground process gets it. A process started in the background by a shell without job
    # control (a CI script's `pytest ... &`) ignores SIGINT, and passes that on to every process it starts: this one
    # would then train on, and the SIGINT tests fail or pass depending on how the test run was started.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    if "KILL_AFTER_STEPS" in os.environ:
        _after_steps(int(os.environ["KILL_AFTER_STEPS"]))
    if "KILL_AT" in os.environ:
        _at_call(os.environ["KILL_AT"], int(os.environ.get("KILL_AT_CALL", "1")))
    from surgical_peft.cli import main

    sys.exit(main(sys.argv[1:]))
