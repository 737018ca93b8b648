r"""MM-WHS (MR), the paper's protocol and hyper-parameters (docs/METHOD.md §9-§10).

  python -m jaxcl.main --config=configs/mmwhs.py --workdir=DIR --config.data.root=/data/MMWHS

Needs the MM-WHS 2017 MR training data (https://zmiclab.github.io/zxh/0/mmwhs/):
mr_train_10XX_image.nii.gz and mr_train_10XX_label.nii.gz under data.root. 160² at 1.5 mm;
seven structures (Myo, LA, LV, RA, RV, AA, PA). The paper reports mean test Dice 0.569 for
G^D + L^R with one labelled volume (0.451 random init).

`configs/mmwhs.py:quick` runs every stage for a few steps.
"""

import ml_collections

from configs import base, common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = base.get_config()
    config.data.dataset = "mmwhs"
    config.data.target_resolution = 1.5
    config.data.image_size = 160
    return common.apply_arg(config, arg, "configs/mmwhs.py")
