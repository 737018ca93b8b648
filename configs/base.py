"""Shared defaults: the paper's protocol and hyper-parameters (docs/METHOD.md §9).

Dataset configs (`configs/<dataset>.py`) start from `get_config()` here and set the data
section. Batch-size keys left at None take the paper's value for the chosen strategy
(`jaxcl.methods.Method.batch`), so `--config.pretrain_global.strategy=GR` alone
switches to the G^R batch of 24 slices x 2 views.
"""

import ml_collections

STAGES = ("pretrain_global", "pretrain_local", "finetune", "evaluate")


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.stages = STAGES

    config.data = ml_collections.ConfigDict()
    config.data.dataset = "acdc"
    config.data.root = ""  # manually downloaded data (not needed for "synthetic")
    config.data.data_dir = ""  # TFDS data dir; "" means ~/tensorflow_datasets
    # None (configs/folder.py): derived from the training cases (docs/DATA.md).
    config.data.image_size = ml_collections.config_dict.placeholder(int)
    config.data.image_size = 192
    config.data.target_resolution = ml_collections.config_dict.placeholder(float)
    config.data.target_resolution = 1.36719
    # The axis slices are taken along, after reorienting to RAS: sagittal | coronal | axial, or
    # auto: each volume's axis of largest spacing (axial when isotropic).
    config.data.slice_axis = "auto"
    config.data.frame = "ED"  # ACDC / synthetic cardiac phase
    config.data.n4 = False
    config.data.channel = 0  # image channel of multi-channel "folder" data (nnU-Net _0000 = 0)
    # "folder" only: extra folders of unlabelled NIfTI images for pre-training (comma-separated).
    config.data.unlabelled_roots = ""
    # "folder" only: the splits (jaxcl.data.folder_splits, docs/DATA.md). Empty ids: automatic.
    config.data.splits = ml_collections.ConfigDict()
    config.data.splits.file = ""  # a splits.json of an earlier run (WORKDIR/splits.json)
    config.data.splits.test = ""  # comma-separated case ids
    config.data.splits.val = ""
    config.data.splits.labelled = ""  # "tr1-c1=case_a; tr2-c1=case_a,case_b"
    config.data.splits.pretrain = ""  # default: every image that is not a test case
    config.data.splits.labelled_sizes = "1,2,8"
    config.data.splits.combinations_per_size = 3
    config.data.splits.test_fraction = 0.2
    config.data.splits.num_val = 2
    config.data.n_partitions = 4
    config.data.labelled_set = "tr1"  # tr1 | tr2 | tr8
    config.data.combination = "c1"
    config.data.eval_chunk_size = 16  # slices per evaluation batch (a multiple of devices)
    # Pre-training pools larger than this (GB of preprocessed volumes, on every host) are not
    # loaded into memory but written once to a slice store under data_dir and read from disk,
    # stream_parallelism steps at a time; same batches either way (docs/DATA.md). Fine-tuning and
    # evaluation sets are always loaded.
    config.data.pretrain_memory_gb = 4.0
    config.data.stream_parallelism = 8

    config.model = ml_collections.ConfigDict()
    config.model.filters = (16, 32, 64, 128, 128, 128)
    config.model.num_decoder_blocks = 3  # l: decoder blocks pre-trained by the local loss
    config.model.global_hidden_features = 1024
    config.model.embedding_features = 128
    config.model.dtype = "float32"  # or "bfloat16"
    config.model.cross_replica_bn = True

    config.augment = ml_collections.ConfigDict()  # overrides of jaxcl.augment.AugmentConfig

    config.pretrain_global = ml_collections.ConfigDict()
    config.pretrain_global.strategy = "GD"  # GR | GD- | GD | BYOL | BYOL-D (jaxcl.methods)
    config.pretrain_global.steps = 10_000
    config.pretrain_global.learning_rate = 1e-3
    config.pretrain_global.temperature = 0.1
    config.pretrain_global.num_slices = ml_collections.config_dict.placeholder(int)
    config.pretrain_global.num_volumes = ml_collections.config_dict.placeholder(int)
    config.pretrain_global.num_views = ml_collections.config_dict.placeholder(int)
    config.pretrain_global.tau_base = 0.996  # BYOL target EMA

    config.pretrain_local = ml_collections.ConfigDict()
    config.pretrain_local.strategy = "LR"  # LR | LD
    config.pretrain_local.steps = 10_000
    config.pretrain_local.learning_rate = 1e-3
    config.pretrain_local.temperature = 0.1
    config.pretrain_local.positions = "paper"  # paper | grid
    config.pretrain_local.grid_size = ml_collections.config_dict.placeholder(int)
    config.pretrain_local.negatives = "all"  # all | paper
    config.pretrain_local.num_slices = ml_collections.config_dict.placeholder(int)
    config.pretrain_local.num_volumes = ml_collections.config_dict.placeholder(int)
    config.pretrain_local.num_views = 2
    # Where a stage loads its pre-trained parts from: None (default) this workdir's stage when it
    # is in config.stages, "" random initialisation, else an export folder (WORKDIR/<stage>/export).
    config.pretrain_local.encoder_from = ml_collections.config_dict.placeholder(str)

    config.finetune = ml_collections.ConfigDict()
    config.finetune.steps = 10_000
    config.finetune.learning_rate = 1e-3
    config.finetune.batch_size = 20
    # supervised | mixup | self-training | adversarial | task-aug | task-aug-mixup
    # (jaxcl.methods.FINE_TUNINGS, docs/METHOD.md)
    config.finetune.method = "supervised"
    config.finetune.mixup_alpha = 0.1  # mixup: λ ~ Beta(α, α) per example
    config.finetune.self_training_rounds = 3  # rounds of pseudo-labelling after the supervised one
    config.finetune.pseudo_label_fraction = 0.5  # self-training: pseudo-labelled share of a batch
    config.finetune.adversarial_weight = 0.1  # adversarial: w_max of the adversarial term
    config.finetune.adversarial_rampup = 0.4  # adversarial: ramp-up length, a fraction of steps
    # task-aug: steps of the UNet alone before the GAN rounds, a fraction of steps (400 / 10,000)
    config.finetune.task_aug_warmup = 0.04
    config.finetune.task_aug_l1_weight = 1e-3  # task-aug: λ of the generators' -λ·mean|output|
    config.finetune.val_every = 50
    config.finetune.encoder_from = ml_collections.config_dict.placeholder(str)  # as above
    config.finetune.decoder_from = ml_collections.config_dict.placeholder(str)

    # What the evaluate stage scores: model_from None is this workdir's fine-tuned model, else any
    # fine-tuning export (or a workdir); split is "test", "val", a labelled set ("tr1-c1") or
    # "labelled" (every labelled case of config.data, e.g. another dataset's).
    config.evaluate = ml_collections.ConfigDict()
    config.evaluate.model_from = ml_collections.config_dict.placeholder(str)
    config.evaluate.split = "test"

    config.parallel = ml_collections.ConfigDict()
    config.parallel.mode = "pmap"  # pmap | shard_map

    # Runs over several processes (jaxcl.train.distributed): Cloud TPU VMs are detected; elsewhere
    # set coordinator_address ("host:port" of process 0), num_processes and process_id on every
    # process, or cluster="slurm" | "ompi" | "mpi4py" to read them from the launcher.
    config.distributed = ml_collections.ConfigDict()
    config.distributed.cluster = "auto"  # auto | none | slurm | ompi | mpi4py
    config.distributed.coordinator_address = ""
    config.distributed.num_processes = ml_collections.config_dict.placeholder(int)
    config.distributed.process_id = ml_collections.config_dict.placeholder(int)
    config.distributed.local_device_ids = ml_collections.config_dict.placeholder(tuple)

    # The paper's experiment grid, run by `python -m jaxcl.experiments` (docs/EXPERIMENTS.md).
    # Comma-separated lists, e.g. --config.sweep.inits=random,GD+LR. Fine-tuning seeds; the
    # pre-trainings use config.seed. combinations: "all" = every subset the dataset defines.
    config.sweep = ml_collections.ConfigDict()
    config.sweep.inits = "random,GR,GD-,GD,BYOL,BYOL-D,GR+LR,GR+LD,GD+LR,GD+LD"
    config.sweep.labelled_sets = "tr1,tr2,tr8"
    config.sweep.combinations = ml_collections.ConfigDict(
        {"tr1": "all", "tr2": "all", "tr8": "all"}
    )
    config.sweep.seeds = "0"

    config.log_every = 50
    config.checkpoint_every = 500
    return config
