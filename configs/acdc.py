r"""ACDC (end-diastole), the paper's protocol and hyper-parameters (docs/METHOD.md §9-§10).

  python -m jaxcl.main --config=configs/acdc.py --workdir=DIR --config.data.root=/data/ACDC

Needs the ACDC training set (https://www.creatis.insa-lyon.fr/Challenge/acdc/) unpacked under
data.root (the patientXXX folders, or the `database/training/` tree). G^D global pre-training
(10,000 steps, 6 volumes x 4 partitions x 2 views), L^R local pre-training (10,000 steps, 10
slices x 2 views), fine-tuning on tr1-c1 (10,000 steps, batch 20), 192² at 1.36719 mm; the paper
reports mean test Dice 0.725 for G^D + L^R with one labelled volume (0.614 random init).

`configs/acdc.py:quick` runs every stage for a few steps (machinery check on real data).
"""

import ml_collections

from configs import base, common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = base.get_config()
    config.data.dataset = "acdc"
    config.data.target_resolution = 1.36719
    config.data.image_size = 192
    return common.apply_arg(config, arg, "configs/acdc.py")
