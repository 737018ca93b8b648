#!/usr/bin/env python3
r"""Training-step speed of the ORIGINAL TF1 code (krishnabits001/domain_specific_cl) at 192x192.

Builds each stage's training graph by calling the original repository's own functions
(models.modelObj.encoder_pretrain_net / decoder_pretrain_net / seg_unet, with its layers_bn.py
and losses.py, and its experiment_init/init_acdc.py config), with the hyper-parameters of
train_model/pretrain_and_fine_tune_script.sh, and times `sess.run` of exactly the fetches each
original training script runs per iteration, on random numpy batches fed through feed_dict
(the input pipeline / augmentation graphs are not built or timed).

Stages (ACDC config: 192x192x1, 4 classes, Adam lr 1e-3, temperature 0.1, filters 16..128):
  gd  G^D encoder pre-training: encoder_pretrain_net(global_loss_exp_no=2, n_parts=4) with
      batch_size_ft=12 (--bt_size=12) -> 48 images/step; fetches train_summary, reg_cost,
      optimizer_unet_reg (Adam on enc_/dec_/reg_ vars).
  lr  L^R decoder pre-training: decoder_pretrain_net(local_loss_exp_no=0, local_reg_size=1 (3x3),
      no_of_local_regions=13, no_of_neg_local_regions=5, no_of_decoder_blocks=3, wgt_en=1) with
      batch_size_ft=10 (the script does not override init_acdc's value) -> 20 images/step
      (10 images x 2 views, interleaved); Adam only on dec_/seg_/reg_ vars (encoder frozen).
      Expect minutes: the unrolled loss loops make a ~530k-op graph (build ~2.5 min, first
      sess.run ~3 min on 2 cores, ~7 GB RSS).
  ft  fine-tuning: seg_unet(dsc_loss=2, en_1hot=1, mtask_en=0), batch mtask_bs=20, one-hot float
      labels; fetches train_summary, seg_cost, optimizer_unet_all (Adam on enc_/dec_/seg_ vars).

--iteration also times each stage's per-iteration input work as the original training script
does it before its training sess.run (random volumes stand in for the data): G^D
sample_minibatch_for_global_loss_opti + crop_batch (skimage resize) twice + 4 runs of
brit_cont_net + stitch_batch_global_loss_gd; L^R shuffle_minibatch + 2 runs of brit_cont_net +
stitch_two_crop_batches; fine-tuning shuffle_minibatch_mtask + augmentation_function (scipy /
skimage rotations, scaling, flips) + create_rand_augs (calc_deform's bicubic deformation fields,
deform_net's dense_image_warp of the images and one-hot labels, contrast_net), with the scripts'
defaults (bbox_dim 100; sigma 5, rd_en = ri_en = rd_ni = 1). The original's utils.py needs scipy
and scikit-image in the venv. The median of --steps such inputs is reported as input_median_s,
and step + input as iteration_s: one training iteration of the original script. jaxcl's steps
include their augmentation (`train_step.py` prints its share).

TF2 compatibility shims (the only deviations): the original modules' global `tf` is pointed at
tf.compat.v1 (with v2 behaviour disabled: graph mode, ref variables, v1 control flow), except that
tf.layers.dense / tf.layers.flatten -- removed from TF>=2.16 with Keras 3 -- are re-expressed with
tf.compat.v1 variable_scope/get_variable/matmul/reshape, same variable names, glorot-uniform
kernel init and same arithmetic; and tf.contrib.image.dense_image_warp (deform_net, --iteration
only), removed with tf.contrib, is re-expressed with tf.compat.v1 ops (bilinear sampling at
pixel - flow, clamped at the border, as TensorFlow Addons' version).

Usage:
  VENV/bin/python benchmarks/tf1_original.py --src=DIR --stages=gd,ft --steps=8 --warmup=2
  (VENV: python3 -m venv VENV && VENV/bin/pip install "tensorflow-cpu==2.21.*" numpy
   [scipy scikit-image for --iteration];
   DIR: a checkout of krishnabits001/domain_specific_cl, or --mirror=BARE_GIT_DIR to extract one)
The original source is taken from --src; if that folder is missing it is extracted there from
the bare git dir given by --mirror (`git archive HEAD`).

Only ratios from one sitting mean anything on a shared machine: run
`PYTHONPATH=. python benchmarks/train_step.py --stages=GD,LR,finetune` right after it (the table
of docs/TRAINING.md was made so). The jaxcl virtual environment can run this script too: it has
tensorflow-cpu (for tensorflow-datasets).
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import types

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

MIRROR = os.environ.get("DSCL_MIRROR", "")


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--stages", default="gd,lr,ft", help="comma list of gd, lr, ft")
    p.add_argument("--steps", type=int, default=20, help="timed steps per stage")
    p.add_argument(
        "--warmup",
        type=int,
        default=2,
        help="untimed warm-up steps run after the first step (which is always run and "
        "reported as first_step_s) and before the timed steps",
    )
    p.add_argument(
        "--src", default=os.environ.get("DSCL_SRC", "dscl"), help="checkout of domain_specific_cl"
    )
    p.add_argument("--mirror", default=MIRROR, help="bare git dir to extract --src from if missing")
    p.add_argument(
        "--intra",
        type=int,
        default=0,
        help="intra_op_parallelism_threads (0 = TF default, all cores)",
    )
    p.add_argument(
        "--inter", type=int, default=0, help="inter_op_parallelism_threads (0 = TF default)"
    )
    p.add_argument(
        "--iteration",
        action="store_true",
        help="also time the original scripts' per-iteration input work (needs scikit-image)",
    )
    a = p.parse_args()
    a.stages = [s.strip() for s in a.stages.split(",") if s.strip()]
    bad = [s for s in a.stages if s not in ("gd", "lr", "ft")]
    if bad:
        p.error(f"unknown stages {bad}")
    return a


def ensure_src(src, mirror):
    if os.path.isfile(os.path.join(src, "models.py")):
        return
    if not os.path.isdir(mirror):
        sys.exit(f"no original code at {src} and no mirror at {mirror}")
    os.makedirs(src, exist_ok=True)
    subprocess.run(f"git --git-dir={mirror} archive HEAD | tar -x -C {src}", shell=True, check=True)


ARGS = parse_args()
ensure_src(ARGS.src, ARGS.mirror)

import numpy as np  # noqa: E402
import tensorflow as tf_real  # noqa: E402
import tensorflow.compat.v1 as tf  # noqa: E402

tf.disable_v2_behavior()
tf.logging.set_verbosity(tf.logging.ERROR)


# ---------------------------------------------------------------------------------------------
# Shim: tf.layers.{dense,flatten} (TF1) re-expressed with tf.compat.v1 ops; everything else is
# tf.compat.v1 itself.
class _Layers:
    @staticmethod
    def flatten(inputs, name=None):
        dims = inputs.shape.as_list()[1:]
        return tf.reshape(inputs, [-1, int(np.prod(dims))], name=name)

    @staticmethod
    def dense(inputs, units, activation=None, use_bias=True, name=None, reuse=None):
        with tf.variable_scope(name, default_name="dense", reuse=reuse):
            kernel = tf.get_variable(
                "kernel",
                [int(inputs.shape[-1]), units],
                dtype=tf.float32,
                initializer=tf.glorot_uniform_initializer(),
            )
            out = tf.matmul(inputs, kernel)
            if use_bias:
                bias = tf.get_variable(
                    "bias", [units], dtype=tf.float32, initializer=tf.zeros_initializer()
                )
                out = tf.nn.bias_add(out, bias)
            return activation(out) if activation is not None else out


def _dense_image_warp(image, flow, name=None):
    """tf.contrib.image.dense_image_warp: out[b, y, x] = image[b, y - flow[b, y, x, 0],
    x - flow[b, y, x, 1]], bilinear, the query clamped to the image."""
    with tf.name_scope(name or "dense_image_warp"):
        _, height, width, _ = image.shape.as_list()
        rows, columns = tf.meshgrid(tf.range(height), tf.range(width), indexing="ij")
        grid = tf.cast(tf.stack([rows, columns], axis=-1), flow.dtype)[None]
        query = grid - flow
        limits = tf.constant([height - 1, width - 1], flow.dtype)
        floor = tf.clip_by_value(tf.floor(query), 0.0, limits - 1)
        alpha = tf.clip_by_value(query - floor, 0.0, 1.0)
        floor = tf.cast(floor, tf.int32)

        def at(dy, dx):
            index = floor + tf.constant([dy, dx], tf.int32)
            return tf.gather_nd(image, index, batch_dims=1)

        top = at(0, 0) + alpha[..., 1:] * (at(0, 1) - at(0, 0))
        bottom = at(1, 0) + alpha[..., 1:] * (at(1, 1) - at(1, 0))
        return top + alpha[..., :1] * (bottom - top)


class _Contrib:
    image = types.SimpleNamespace(dense_image_warp=_dense_image_warp)


class _TF1(types.ModuleType):
    layers = _Layers
    contrib = _Contrib

    def __getattr__(self, name):
        return getattr(tf, name)


TF1 = _TF1("tensorflow_v1_shim")

sys.path.insert(0, ARGS.src)
import experiment_init.init_acdc as cfg_acdc  # noqa: E402  (original config)
import layers_bn  # noqa: E402  (original)
import losses  # noqa: E402  (original)
import models  # noqa: E402  (original)

for _m in (layers_bn, losses, models):
    _m.tf = TF1

IMG = (cfg_acdc.img_size_x, cfg_acdc.img_size_y, cfg_acdc.num_channels)


def fresh_cfg(**over):
    c = types.SimpleNamespace(**{k: v for k, v in vars(cfg_acdc).items() if not k.startswith("_")})
    for k, v in over.items():
        setattr(c, k, v)
    return c


def count_params(var_list):
    seen, n = set(), 0
    for v in var_list:
        if v.name not in seen:
            seen.add(v.name)
            n += int(np.prod(v.shape.as_list()))
    return n


def vars_matching(prefixes):
    # same name filters as the original builds its optimizer var_list with
    return [v for v in tf.trainable_variables() if any(p in v.name for p in prefixes)]


def brit_cont(x, rng):
    """numpy stand-in for the original brit_cont_net (random brightness +-0.3, contrast 0.7..1.3,
    clip to [0, 1.5]) so positive pairs are views of one image; values do not affect step time."""
    d = rng.uniform(-0.3, 0.3, (len(x), 1, 1, 1)).astype(np.float32)
    f = rng.uniform(0.7, 1.3, (len(x), 1, 1, 1)).astype(np.float32)
    y = x + d
    m = y.mean(axis=(1, 2), keepdims=True)
    return np.clip((y - m) * f + m, 0, 1.5).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Stage builders: call the original functions with the original scripts' arguments.
def build_gd(rng):
    # pretr_encoder_global_contrastive_loss.py --global_loss_exp_no=2 --n_parts=4 --temp_fac=0.1
    # --bt_size=12 : cfg.batch_size_ft = bt_size before modelObj(cfg)
    cfg = fresh_cfg(batch_size_ft=12)
    model = models.modelObj(cfg)
    ae = model.encoder_pretrain_net(
        learn_rate_seg=cfg.lr, temp_fac=0.1, global_loss_exp_no=2, n_parts=4
    )
    n = 4 * cfg.batch_size_ft  # 48
    # stitch_batch_global_loss_gd fills 16-image blocks [x_i | aug x_i | x_j | aug x_j] (4
    # partitions each) and its loop breaks before the third block, so rows 32..47 stay zero in the
    # original.
    x = np.zeros((n,) + IMG, np.float32)
    for b in range(2):
        xi, xj = rng.random((2, 4) + IMG, dtype=np.float32)
        x[16 * b : 16 * b + 16] = np.concatenate([xi, brit_cont(xi, rng), xj, brit_cont(xj, rng)])
    feed = {ae["x"]: x, ae["train_phase"]: True}
    fetches = [ae["train_summary"], ae["reg_cost"], ae["optimizer_unet_reg"]]
    desc = (
        "encoder_pretrain_net(global_loss_exp_no=2 [G^D], n_parts=4, temp_fac=0.1, lr=1e-3), "
        "batch_size_ft=12 -> 48 images: 2 blocks [x_i|aug x_i|x_j|aug x_j] x 4 partitions "
        "+ 16 zero rows, as the original stitch leaves them"
    )
    return feed, fetches, n, vars_matching(("enc_", "dec_", "reg_")), desc


def build_lr(rng):
    # pretr_decoder_local_contrastive_loss.py --local_reg_size=1 --no_of_local_regions=13
    # --temp_fac=0.1 --local_loss_exp_no=0 --no_of_decoder_blocks=3 --no_of_neg_local_regions=5
    # (wgt_en=1, no_of_neg_regs_override=4 defaults); cfg.batch_size_ft stays 10 -> bs = 20
    cfg = fresh_cfg()
    model = models.modelObj(cfg)
    ae = model.decoder_pretrain_net(
        learn_rate_seg=cfg.lr,
        temp_fac=0.1,
        no_of_local_regions=13,
        no_of_decoder_blocks=3,
        local_loss_exp_no=0,
        local_reg_size=1,
        wgt_en=1,
        no_of_neg_local_regions=5,
        no_of_neg_regs_override=4,
    )
    n = 2 * cfg.batch_size_ft  # 20: stitch_two_crop_batches interleaves view1/view2 of 10 images
    img = rng.random((cfg.batch_size_ft,) + IMG, dtype=np.float32)
    x = np.empty((n,) + IMG, np.float32)
    x[0::2], x[1::2] = brit_cont(img, rng), brit_cont(img, rng)
    feed = {ae["x"]: x, ae["train_phase"]: True}
    fetches = [ae["train_summary"], ae["reg_cost"], ae["optimizer_unet_dec"]]
    desc = (
        "decoder_pretrain_net(local_loss_exp_no=0 [L^R], 3x3 regions, 13 regions, 5 negs, "
        "3 decoder blocks, wgt_en=1, temp 0.1, lr=1e-3), batch 20 = 10 images x 2 views"
    )
    return feed, fetches, n, vars_matching(("dec_", "seg_", "reg_")), desc


def build_ft(rng):
    # ft_pretr_encoder_decoder_net_local_loss.py defaults: dsc_loss=2, rd_en=1 -> en_1hot=1;
    # batch cfg.mtask_bs=20; runs optimizer_unet_all
    cfg = fresh_cfg()
    model = models.modelObj(cfg)
    ae = model.seg_unet(learn_rate_seg=cfg.lr, dsc_loss=2, en_1hot=1, mtask_en=0)
    n = cfg.mtask_bs  # 20
    x = rng.random((n,) + IMG, dtype=np.float32)
    lab = rng.integers(0, cfg.num_classes, size=(n, cfg.img_size_x, cfg.img_size_y))
    y = np.eye(cfg.num_classes, dtype=np.float32)[lab]
    feed = {ae["x"]: x, ae["y_l"]: y, ae["train_phase"]: True}
    fetches = [ae["train_summary"], ae["seg_cost"], ae["optimizer_unet_all"]]
    desc = (
        "seg_unet(dsc_loss=2 [dice with background], en_1hot=1, lr=1e-3), optimizer_unet_all, "
        "batch mtask_bs=20 images + one-hot labels"
    )
    return feed, fetches, n, vars_matching(("enc_", "dec_", "seg_")), desc


BUILDERS = {"gd": build_gd, "lr": build_lr, "ft": build_ft}


# ---------------------------------------------------------------------------------------------
# --iteration: each script's input work per iteration, with the original utils.py functions.
def _original_utils():
    import dataloaders  # noqa: PLC0415 - original; needs nibabel and scikit-image
    import utils  # noqa: PLC0415 - original; needs scipy and scikit-image

    return utils, dataloaders


def gd_inputs(rng):
    # pretr_encoder_global_contrastive_loss.py, global_loss_exp_no=2, bt_size=12 (n_vols = 5)
    utils, _ = _original_utils()
    cfg = fresh_cfg(batch_size_ft=12)
    colour = models.modelObj(cfg).brit_cont_net(batch_size=cfg.batch_size_ft)
    volumes = [rng.random((20,) + IMG, dtype=np.float32) for _ in range(8)]
    b = cfg.batch_size_ft

    def run(sess):
        sets = []
        for _ in range(2):
            images = utils.sample_minibatch_for_global_loss_opti(volumes, cfg, 2 * b, 5, 4)
            crops = utils.crop_batch([images], cfg, 2 * b, 100)
            views = [
                sess.run(colour["rd_fin"], feed_dict={colour["x_tmp"]: crops[i * b : (i + 1) * b]})
                for i in range(2)
            ]
            sets += [images, np.concatenate(views)]
        return utils.stitch_batch_global_loss_gd(cfg, *sets, 4)

    return run


def lr_inputs(rng):
    # pretr_decoder_local_contrastive_loss.py, local_loss_exp_no=0
    utils, _ = _original_utils()
    cfg = fresh_cfg()
    colour = models.modelObj(cfg).brit_cont_net(batch_size=cfg.batch_size_ft)
    images = rng.random(IMG[:2] + (200,), dtype=np.float32)  # slices stacked on axis 2

    def run(sess):
        batch = utils.shuffle_minibatch([images], batch_size=cfg.batch_size_ft, labels_present=0)
        views = [sess.run(colour["rd_fin"], feed_dict={colour["x_tmp"]: batch}) for _ in range(2)]
        return utils.stitch_two_crop_batches(views, cfg, cfg.batch_size_ft)

    return run


def ft_inputs(rng):
    # ft_pretr_encoder_decoder_net_local_loss.py defaults: data_aug=1, sigma=5, rd_en=ri_en=rd_ni=1
    utils, dataloaders = _original_utils()
    cfg = fresh_cfg()
    model = models.modelObj(cfg)
    deform, colour = model.deform_net(batch_size=cfg.mtask_bs), model.contrast_net(cfg.mtask_bs)
    images = rng.random(IMG[:2] + (200,), dtype=np.float32)  # slices stacked on axis 2
    labels = rng.integers(0, cfg.num_classes, IMG[:2] + (200,))
    loader = dataloaders.dataloaderObj(cfg)
    options = types.SimpleNamespace(sigma=5, rd_en=1, ri_en=1, rd_ni=1)

    def run(sess):
        batch = utils.shuffle_minibatch_mtask([images, labels], batch_size=cfg.mtask_bs)
        batch = utils.augmentation_function(list(batch), loader)
        return utils.create_rand_augs(cfg, options, sess, deform, colour, *batch)

    return run


INPUTS = {"gd": gd_inputs, "lr": lr_inputs, "ft": ft_inputs}


def session_config():
    # as the original scripts (allow_growth, soft placement); thread pools at TF's default
    config = tf.ConfigProto()
    config.gpu_options.allow_growth = True
    config.allow_soft_placement = True
    config.intra_op_parallelism_threads = ARGS.intra
    config.inter_op_parallelism_threads = ARGS.inter
    return config


def run_stage(name):
    rng = np.random.default_rng(0)
    load0 = os.getloadavg()[0]
    tf.reset_default_graph()
    t = time.perf_counter()
    feed, fetches, n_img, opt_vars, desc = BUILDERS[name](rng)
    build_s = time.perf_counter() - t
    graph = tf.get_default_graph()
    n_ops = len(graph.get_operations())
    params_opt = count_params(opt_vars)
    params_all = count_params(tf.trainable_variables())
    inputs = INPUTS[name](rng) if ARGS.iteration else None
    print(f"[{name}] {desc}", flush=True)
    print(
        f"[{name}] graph build {build_s:.2f} s, {n_ops} ops, trainable params optimized "
        f"{params_opt:,} (all trainable in graph {params_all:,})",
        flush=True,
    )

    with tf.Session(config=session_config()) as sess:
        t = time.perf_counter()
        sess.run(tf.global_variables_initializer())
        init_s = time.perf_counter() - t
        t = time.perf_counter()
        out = sess.run(fetches, feed_dict=feed)
        first_s = time.perf_counter() - t
        loss_first = float(np.mean(out[1]))
        print(
            f"[{name}] variable init {init_s:.2f} s, first step {first_s:.2f} s, "
            f"loss {loss_first:.5f}",
            flush=True,
        )
        for _ in range(ARGS.warmup):
            sess.run(fetches, feed_dict=feed)
        times = []
        for _ in range(ARGS.steps):
            t = time.perf_counter()
            out = sess.run(fetches, feed_dict=feed)
            times.append(time.perf_counter() - t)
        loss_last = float(np.mean(out[1]))
        input_times = []
        if inputs is not None:
            inputs(sess)  # warm-up
            for _ in range(ARGS.steps):
                t = time.perf_counter()
                inputs(sess)
                input_times.append(time.perf_counter() - t)
    med = statistics.median(times) if times else float("nan")
    res = {
        "bench": "tf1_original",
        "stage": name,
        "tf_version": tf_real.__version__,
        "images_per_step": n_img,
        "graph_build_s": round(build_s, 3),
        "graph_ops": n_ops,
        "var_init_s": round(init_s, 3),
        "first_step_s": round(first_s, 3),
        "warmup_steps_after_first": ARGS.warmup,
        "timed_steps": len(times),
        "median_s": round(med, 4),
        "min_s": round(min(times), 4) if times else None,
        "max_s": round(max(times), 4) if times else None,
        "images_per_s": round(n_img / med, 3) if times else None,
        "trainable_params_optimized": params_opt,
        "trainable_params_graph": params_all,
        "loss_first": loss_first,
        "loss_last": loss_last,
        "cpu_count": os.cpu_count(),
        "intra_op_threads": ARGS.intra,
        "inter_op_threads": ARGS.inter,
        "loadavg1_start": round(load0, 2),
        "loadavg1_end": round(os.getloadavg()[0], 2),
        "process_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    if input_times:
        input_med = statistics.median(input_times)
        res["input_median_s"] = round(input_med, 4)
        res["iteration_s"] = round(med + input_med, 4)
        print(
            f"[{name}] the script's input work per iteration: median {input_med:.3f} s -> "
            f"iteration {med + input_med:.3f} s, {n_img / (med + input_med):.2f} images/s",
            flush=True,
        )
    if times:
        print(
            f"[{name}] {len(times)} timed steps: median {med:.3f} s, min {min(times):.3f} s, "
            f"max {max(times):.3f} s -> {n_img / med:.2f} images/s (loss {loss_last:.5f}, "
            f"load {res['loadavg1_start']}->{res['loadavg1_end']})",
            flush=True,
        )
    return res


def main():
    print(
        f"TF {tf_real.__version__} (compat.v1 graph mode), numpy {np.__version__}, "
        f"original code {ARGS.src}, {os.cpu_count()} CPUs, stages {ARGS.stages}, "
        f"first step + {ARGS.warmup} warm-up + {ARGS.steps} timed steps per stage",
        flush=True,
    )
    results = []
    for name in ARGS.stages:
        try:
            results.append(run_stage(name))
        except Exception as e:  # keep the other stages' numbers
            print(f"[{name}] FAILED: {type(e).__name__}: {e}", flush=True)
            results.append(
                {"bench": "tf1_original", "stage": name, "error": f"{type(e).__name__}: {e}"}
            )
    print("# JSON, one line per stage:")
    for r in results:
        print(json.dumps(r))
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
