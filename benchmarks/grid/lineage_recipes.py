"""The lineages' official training recipes (`train: {recipe: <name>}` in a grid): plain
mappings of TrainConfig keys (benchmarks/grid/recipes.py), one per official train.py."""

# Named recipes: `train: {recipe: pfenet, steps: …}` — the official training settings of a
# lineage (every optimiser key, so a method's recipe replaces the grid's); keys written beside
# `recipe` override them. Expanded when a grid is read: a cell's identity holds the values.
RECIPES = {
    # juhongm999/hsnet train.py: Adam 1e-3 (no weight decay), constant, a batch of 20 1-shot
    # episodes, backbone frozen in eval mode (train_mode()), no augmentation, 400 px.
    "hsnet": {
        "optimizer": "adam",
        "lr": 0.001,
        "weight_decay": 0.0,
        "lr_schedule": "constant",
        "episodes_per_step": 20,
        "batchnorm": {"backbone": "eval"},
        "lr_mult": {},
        "nesterov": False,
        "augment": "none",
        "input_size": 400,
        "sampler": "official",
    },
    # dvlab-research/PFENet train.py + config: SGD 2.5e-3, momentum 0.9, wd 1e-4, poly 0.9,
    # batch 4 with the backbone's BatchNorm in train mode (model.train()), its augmentation and
    # 473 crops. Its poly_learning_rate(index_split=-1) gives every group lr × 10: lr_mult 10.
    "pfenet": {
        "optimizer": "sgd",
        "lr": 0.0025,
        "lr_mult": {"head": 10.0},
        "momentum": 0.9,
        "weight_decay": 0.0001,
        "lr_schedule": "poly",
        "poly_power": 0.9,
        "episodes_per_step": 4,
        "batchnorm": {},
        "nesterov": False,
        "augment": "pfenet",
        "input_size": 473,
        "sampler": "official",
    },
    # chunbolang/BAM train_base.py + config/pascal/*_base.yaml: the PSPNet base learner on
    # image batches of 12 (3 per GPU × 4), SGD 2.5e-4 (index_split 0: the encoder at lr, PPM
    # and classifier at 10·lr), momentum 0.9, wd 1e-4, poly 0.9, 417 crops at scales 0.5–2.0,
    # BatchNorm training. COCO's config sets index_split −1 (lr_mult {backbone: 10, head: 10}).
    "pspnet_base": {
        "optimizer": "sgd",
        "lr": 0.00025,
        "lr_mult": {"head": 10.0},
        "momentum": 0.9,
        "weight_decay": 0.0001,
        "lr_schedule": "poly",
        "poly_power": 0.9,
        "images_per_step": 12,
        "batchnorm": {},
        "nesterov": False,
        "augment": "pspnet",
        "input_size": 417,
        "sampler": "images",
    },
    # chunbolang/BAM train.py + config/pascal/*.yaml: the meta learner (backbone and base
    # learner frozen, every BatchNorm in eval: fix_bn), SGD 5e-3 × 10 (index_split −1),
    # momentum 0.9, wd 1e-4, poly 0.9, 8 episodes per step (2 per GPU × 4), PFENet's
    # augmentation and 473 crops, PFENet's sampler over the list without novel-class images.
    "bam": {
        "optimizer": "sgd",
        "lr": 0.005,
        "lr_mult": {"meta": 10.0},
        "momentum": 0.9,
        "weight_decay": 0.0001,
        "lr_schedule": "poly",
        "poly_power": 0.9,
        "episodes_per_step": 8,
        "batchnorm": {"backbone": "eval", "base": "eval"},
        "nesterov": False,
        "augment": "pfenet",
        "input_size": 473,
        "sampler": "official",
        "exclude_novel_images": True,
    },
    # Pbihao/HDMNet train.py + config/pascal/*_manet.yaml: AdamW 1e-4 (the transformer at lr,
    # the other trained layers at 10·lr: index_split 0), wd 0.01, poly 0.9, 16 episodes per step
    # (4 per GPU × 4), every BatchNorm in eval (fix_bn), BAM's data pipeline.
    "hdmnet": {
        "optimizer": "adamw",
        "lr": 0.0001,
        "lr_mult": {"meta": 10.0},
        "momentum": 0.9,
        "weight_decay": 0.01,
        "lr_schedule": "poly",
        "poly_power": 0.9,
        "episodes_per_step": 16,
        "batchnorm": {"backbone": "eval", "base": "eval", "transformer": "eval", "meta": "eval"},
        "nesterov": False,
        "augment": "pfenet",
        "input_size": 473,
        "sampler": "official",
        "exclude_novel_images": True,
    },
}
# slei109/PATNet train.py: HSNet's recipe with a batch of 2 episodes (its --bsz default), on
# PASCAL with no held-out class (--fold 4: every class; a grid's `train: {fold: all}`).
RECIPES["patnet"] = {**RECIPES["hsnet"], "episodes_per_step": 2}
