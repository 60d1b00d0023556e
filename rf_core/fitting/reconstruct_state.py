"""Does a saved state fit a ``Reconstructor``? Checked in full before anything is loaded, so
that a checkpoint from another config is one line naming the first tensor that differs."""

from __future__ import annotations

import torch


def check_state(recon, state) -> None:
    """Raise CheckpointError, one line, unless ``state`` fits this model exactly."""
    from rf_core.files.checkpoint import (  # local: only resuming needs it
        CheckpointError,
        check_training_state,
    )

    def bad(problem: str) -> CheckpointError:
        return CheckpointError(f"the checkpoint does not fit this reconstruction: {problem} "
                               "(saved with another config?); rerun with --overwrite to "
                               "start over")

    if not isinstance(state, dict):
        raise bad(f"its state is a {type(state).__name__}, not a dict")
    for key in ("step", "field", "occupancy", "optimizer", "scaler", "gen"):
        if key not in state:
            raise bad(f"its state has no {key!r}")
    if not isinstance(state["step"], int) or isinstance(state["step"], bool):
        raise bad(f"its 'step' is {state['step']!r}, not an integer")
    for name, module in (("field", recon.field), ("occupancy", recon.renderer.occupancy)):
        _check_tensors(bad, name, module.state_dict(), state[name])
    gens = [("gen", recon.gen)] + ([("dev_gen", recon.dev_gen)]
                                  if "dev_gen" in state and recon.dev_gen is not recon.gen
                                  else [])
    check_training_state(state, recon.optimizer, gens, bad)


def _check_tensors(bad, name: str, expected: dict, got) -> None:
    """Compare a saved module state dict ``got`` with the module's own ``expected``."""
    if not isinstance(got, dict):
        raise bad(f"its {name!r} is not a state dict")
    for key, want in expected.items():
        if key not in got:
            raise bad(f"tensor '{name}.{key}' is missing (this model has shape "
                      f"{list(want.shape)})")
        have = got[key]
        if not isinstance(have, torch.Tensor):
            raise bad(f"'{name}.{key}' is a {type(have).__name__}, not a tensor")
        if have.shape != want.shape:
            raise bad(f"tensor '{name}.{key}' has shape {list(have.shape)}, this model "
                      f"expects {list(want.shape)}")
    extra = [k for k in got if k not in expected]
    if extra:
        raise bad(f"tensor '{name}.{extra[0]}' is not part of this model")
