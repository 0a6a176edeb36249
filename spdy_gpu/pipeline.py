"""The method's stages as library calls on a model entry: what a CLI command or a notebook
runs. Each function takes the library's own types and returns a result; none prints."""

from __future__ import annotations

import os
from pathlib import Path

from .data import CalibrationSpec
from .models import ModelEntry, ModelSetting
from .profile import Profile
from .reconstruct import Database, GapReport, global_adaprune_, stitch_


def global_adaprune_profile(entry: ModelEntry, setting: ModelSetting, database: Database,
                            profile: Profile, calibration: CalibrationSpec,
                            out: str | os.PathLike, *, lr: float = 1e-5, epochs: int = 10,
                            patience: int = 2, only_pruned: bool = False,
                            metadata: dict[str, str] | None = None,
                            progress: bool = True) -> GapReport:
    """Stitch `profile` from `database`, fine-tune it against the dense model (gAP) and save
    the weights (safetensors state dict) to `out`, atomically."""
    from safetensors.torch import save_model

    model, example = entry.build(setting)
    dense, _ = entry.build(setting)
    database.check_model(model)
    database.check_options(list(set(profile.choices.values())))
    stitch_(model, profile.choices, database)
    modules = dict(model.named_modules())
    masks = {name: modules[name].weight.detach() != 0 for name, option in
             profile.choices.items() if option.pattern != "dense"}
    batches = calibration.load(entry, setting, example).batches
    report = global_adaprune_(model, dense, masks, batches, lr=lr, epochs=epochs,
                              only_pruned=only_pruned, patience=patience, progress=progress)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(out).with_name(f".{Path(out).name}.tmp")
    save_model(model, str(tmp), metadata=metadata, force_contiguous=True)
    tmp.replace(out)
    return report
