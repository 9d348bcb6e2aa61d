"""Lightning's ``FSDPStrategy`` (FSDP1) on CPU processes with gloo: the CUDA-only strategy run
by the suite, with the device as the only stand-in.

Two things keep ``FSDPStrategy`` off CPU, neither of them code under test: Lightning's
accelerator connector refuses ``type(strategy) is FSDPStrategy`` with a CPU accelerator (a
subclass passes), and Lightning hands FSDP ``device_id=root_device.index``, None on CPU, where
torch's FSDP1 then looks for an accelerator (given ``torch.device("cpu")`` it runs on CPU).
Everything else is the real code: the wrap policy, activation checkpointing, mixed precision,
the gradient reduce-scatter, Lightning's ``FSDPPrecision`` and optimizer step, and
``PreferenceModule`` inside it. Subprocess scripts import it with ``tests/`` on ``sys.path``.
"""

from __future__ import annotations

from unittest import mock

import torch
from lightning.pytorch.strategies import FSDPStrategy


class CPUFSDPStrategy(FSDPStrategy):
    """``FSDPStrategy`` whose FSDP units are built with ``device_id=torch.device("cpu")``."""

    def _setup_model(self, model):
        import torch.distributed.fsdp as fsdp

        class OnCPU(fsdp.FullyShardedDataParallel):
            def __init__(self, *args, device_id=None, **kwargs):
                super().__init__(*args, device_id=device_id or torch.device("cpu"), **kwargs)

        # Lightning imports the class from the package inside _setup_model; the units the
        # auto-wrap policy creates inherit the root's device_id.
        with mock.patch.object(fsdp, "FullyShardedDataParallel", OnCPU):
            return super()._setup_model(model)


def unwrapped_name(name: str) -> str:
    """A parameter name without the FSDP1 and checkpoint-wrapper prefixes."""
    for prefix in ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module."):
        name = name.replace(prefix, "")
    return name
