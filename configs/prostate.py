r"""MSD Prostate (Task05, T2), the paper's protocol and hyper-parameters (docs/METHOD.md §9-§10).

  python -m jaxcl.main --config=configs/prostate.py --workdir=DIR --config.data.root=/data/Task05

Needs Task05_Prostate from the Medical Segmentation Decathlon (http://medicaldecathlon.com/)
with imagesTr/ and labelsTr/ under data.root. 192² at 0.625 mm; classes PZ and TZ. The paper
reports mean test Dice 0.579 for G^D + L^R with one labelled volume (0.489 random init).

`configs/prostate.py:quick` runs every stage for a few steps.
"""

import ml_collections

from configs import base, common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = base.get_config()
    config.data.dataset = "prostate"
    config.data.target_resolution = 0.625
    config.data.image_size = 192
    return common.apply_arg(config, arg, "configs/prostate.py")
