r"""Your own MSD / nnU-Net style dataset: the paper's protocol, splits and settings from the data.

  python -m jaxcl.main --config=configs/folder.py --workdir=DIR --config.data.root=ROOT

ROOT holds imagesTr/ (<case>.nii.gz or nnU-Net's <case>_0000.nii.gz), labelsTr/<case>.nii.gz and
dataset.json (nnU-Net v1 or v2 form: the label values and names, the channels); images in
imagesTs/ and in the folders of --config.data.unlabelled_roots=DIR1,DIR2 are used, unlabelled,
for pre-training. What to expect (docs/DATA.md):

- The splits are drawn from the sorted case ids and config.seed: 20% of the labelled cases for
  testing, 2 for validation, the rest for labelled sets of 1, 2 and 8 cases (3 subsets each,
  capped by what is available). They are logged and written to DIR/splits.json; pass
  --config.data.splits.file=DIR/splits.json (or the keys of config.data.splits) to fix them.
- The in-plane resolution and crop size are derived from the training cases (median spacing;
  the median foreground extent plus margins, a multiple of 32), and each volume is sliced along
  its thickest axis after reorienting to RAS; every derived value is logged with its reason.
- Then G^D pre-training of the encoder, L^R of the decoder, fine-tuning on tr1-c1 and the test
  Dice table, as for the paper's datasets (10,000 steps each: hours on a GPU, days on a CPU; use
  --config.pretrain_global.steps etc. to shorten them).

The whole grid of the paper on your data (every initialisation x labelled-set size x subset):

  python -m jaxcl.experiments --config=configs/folder.py --workdir=DIR --config.data.root=ROOT

and segmenting new scans with the fine-tuned model:

  python -m jaxcl.predict --model=DIR --input=NEW_SCANS --output=OUT

`configs/folder.py:quick` runs every stage for a few steps at 64x64 (a check of the set-up).
"""

import ml_collections

from configs import base, common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = base.get_config()
    config.data.dataset = "folder"
    config.data.target_resolution = None  # the median in-plane spacing of the training cases
    config.data.image_size = None  # covers the median foreground extent plus margins
    # Every labelled-set size the data allows (1, 2 and 8 capped by the training cases).
    config.sweep.labelled_sets = "all"
    for labelled_set in config.sweep.combinations:
        config.sweep.combinations[labelled_set] = "all"
    return common.apply_arg(config, arg, "configs/folder.py")
