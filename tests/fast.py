"""Recipe overrides that make a digits run take seconds."""

# Small and fast: half the digits, plain SGD, no heavy augmentation (seconds an epoch).
FAST = {
    "data.fraction": 0.5,
    "optim.name": "sgd",
    "optim.lr": 0.1,
    "optim.batch_size": 32,
    "loss.name": "ce",
    "reg.mixup_alpha": 0.0,
    "reg.cutmix_alpha": 0.0,
    "data.rand_augment": None,
    "schedule.warmup_epochs": 0,
}
