r"""The whole protocol on the built-in synthetic cardiac dataset, sized for a 2-core CPU.

  python -m jaxcl.main --config=configs/synthetic.py --workdir=/tmp/jaxcl_synthetic

Generates the 60 synthetic subjects on first use (into ~/tensorflow_datasets), pre-trains the
encoder with G^D and the decoder with L^R, fine-tunes on one labelled volume (tr1-c1) and prints
the test Dice table (16 test subjects, RV / Myo / LV). Images are 96x96 at 2 mm so that every
stage runs in minutes on CPU.

What to expect on an idle 2-core CPU (jax 0.10.2, 2026-11-25): 7.4 min wall with the data
already prepared (generating it adds about half a minute), G^D pre-training at ~110 images/s
(loss 3.42 -> 2.55), L^R at ~110, fine-tuning at ~35 with best validation Dice 0.89, and a mean
test Dice of 0.857 ± 0.131 (RV 0.879, Myo 0.779, LV 0.913; one subject, 047, at 0.39).

`configs/synthetic.py:quick` shrinks everything (64x64, a few steps) for an end-to-end test of
all stages in about a minute; its Dice is meaningless.
"""

import ml_collections

from configs import base, common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = base.get_config()
    config.data.dataset = "synthetic"
    config.data.image_size = 96
    config.data.target_resolution = 2.0
    config.data.labelled_set = "tr1"
    config.data.combination = "c1"

    config.pretrain_global.steps = 300
    config.pretrain_local.steps = 200
    config.finetune.steps = 400
    config.finetune.val_every = 50
    config.log_every = 25
    config.checkpoint_every = 100

    config = common.apply_arg(config, arg, "configs/synthetic.py")
    if arg == "quick":
        config.data.target_resolution = 3.0
    return config
