"""No host-device synchronisation in the training step: on a GPU, reading a tensor back into
Python (.item(), .tolist(), bool(), float(), .cpu(), .numpy()) or a blocking .to(device) makes the
CPU wait for every queued kernel, and the GPU then idles while the next step is prepared. The
loss must be read back only at log steps.

There is no GPU here, so each method's main() runs on the CPU under a TorchFunctionMode that
records every such call made while train_one_epoch is on the stack, batched augmentation included.
Calls made inside torch itself (AdamW's step counter lives on the host) are torch's business."""
import os
import signal
import sys
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode

from conftest import DINO_VIT, METHODS, TINY

READ_BACKS = {"item", "tolist", "__bool__", "__float__", "__int__", "__index__", "__format__", "__array__", "cpu",
              "numpy"}
TORCH_DIR = str(Path(torch.__file__).parent)
# By design on the host: the preemption flags (a CPU tensor, gloo all-reduce), never a device tensor.
HOST_ONLY = {"requested"}  # Preemption.requested


class ReadBackRecorder(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        blocking_to = name == "to" and not kwargs.get("non_blocking") and (
            any(isinstance(a, (torch.device, str)) for a in args[1:]) or "device" in kwargs)
        if name in READ_BACKS or blocking_to:
            self.record(name)
        return func(*args, **kwargs)

    def record(self, name):
        frame = sys._getframe(2)
        while frame.f_code.co_filename.startswith(TORCH_DIR):  # torch's dispatch wrappers (_tensor.py)
            if not frame.f_code.co_filename.endswith(("_tensor.py", "overrides.py")):
                return  # called by torch itself
            frame = frame.f_back
        caller, stack = frame, []
        while frame is not None:
            stack.append(frame.f_code.co_name)
            frame = frame.f_back
        if "train_one_epoch" in stack and caller.f_code.co_name not in HOST_ONLY:
            self.calls.append((name, caller.f_code.co_name, caller.f_lineno))


def run_recorded(module, argv, monkeypatch):
    """module.main() in this process, as a user's shell would start it (no torchrun or SLURM
    variables), under a ReadBackRecorder; the signal handlers main() installs are put back."""
    for key in list(os.environ):
        if key.startswith(("SLURM_", "RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_")):
            monkeypatch.delenv(key)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)}
    try:
        with ReadBackRecorder() as recorder:
            module.main(module.get_args_parser().parse_args([*TINY, *argv]))
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
    return [c[:2] for c in recorder.calls]


@pytest.mark.parametrize("script,extra", [("simclr.py", METHODS["simclr.py"]), ("byol.py", METHODS["byol.py"]),
                                          ("barlow.py", METHODS["barlow.py"]), ("dino.py", DINO_VIT)])
def test_loss_read_back_only_at_log_steps(script, extra, tmp_path, monkeypatch):
    calls = run_recorded(__import__(script[:-3]), [*extra, "--log-every", "3", "--max-steps", "6", "--knn-every", "0",
                                                   "--aug-device", "auto", "--output-dir", str(tmp_path)], monkeypatch)
    assert (tmp_path / "last.pt").exists()
    # 6 steps, a log row every 3: one read-back of [loss, metrics] each time, and nothing else.
    assert calls == [("tolist", "log_row")] * 2, calls


def test_the_recorder_sees_a_read_back_in_the_loop(tmp_path, monkeypatch):
    """The check itself can fail: a loss read back every step (a common mistake) is caught."""
    import simclr
    original = simclr.info_nce_loss

    def loss_read_every_step(z1, z2, temperature):
        loss = original(z1, z2, temperature)
        if loss > 100:  # a bool() of a device tensor
            raise AssertionError
        return loss

    monkeypatch.setattr(simclr, "info_nce_loss", loss_read_every_step)
    calls = run_recorded(simclr, ["--log-every", "100", "--max-steps", "2", "--knn-every", "0",
                                  "--output-dir", str(tmp_path)], monkeypatch)
    assert calls == [("__bool__", "loss_read_every_step")] * 2, calls
