"""The `:quick` switch shared by every config (big_vision's `runlocal` idea)."""

import ml_collections


def shrink(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Tiny network, small images, a few steps per stage and 3 sweep cells: tests the machinery."""
    config.data.image_size = 64
    if config.data.target_resolution is not None:  # None: derived from the data (folder)
        config.data.target_resolution = config.data.target_resolution * 3
    config.model.filters = (8, 8, 16, 16, 16, 16)
    config.model.global_hidden_features = 64
    config.model.embedding_features = 32
    config.pretrain_global.steps = 4
    config.pretrain_local.steps = 4
    config.finetune.steps = 6
    config.finetune.batch_size = 8
    config.finetune.val_every = 3
    config.log_every = 2
    config.checkpoint_every = 3
    # The sweep's machinery on its smallest interesting grid: no pre-training (random), a global
    # one alone (GD) and a local one on top of it (GD+LR), on one labelled volume (tr1-c1).
    config.sweep.inits = "random,GD,GD+LR"
    config.sweep.labelled_sets = "tr1"
    config.sweep.combinations.tr1 = "c1"
    return config


def apply_arg(config: ml_collections.ConfigDict, arg: str | None, name: str):
    """Applies the config argument: None (full size) or "quick"."""
    if arg == "quick":
        return shrink(config)
    if arg:
        raise ValueError(f"{name} takes no argument or 'quick', not {arg!r}.")
    return config
