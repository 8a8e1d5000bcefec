"""The shipped Fashion-MNIST DNL ladder: one recipe, depth-scaled (h = T/N).

    dnl-zoo train --config configs/fmnist_dnl_ladder.py \
        --workdir runs/ladder/dnl_conv_n8 --config.model.name=dnl_conv_n8

dnl_conv_n{1,2,4,8} (local 3x3 transform) and dnl_nonlocal_n{1,2,4,8}
(embedded-Gaussian non-local in blocks 2-3): 3 blocks of N layers, k = 12,
T = 1, h = T/N. Batch 128, SGD with Nesterov momentum 0.9, weight decay 1e-4,
learning rate 0.1 with a 0.3-epoch warm-up and cosine decay over 6 epochs,
random crop (2-pixel padding) and horizontal flip, no depth regulariser. The
blocks run the `lean` implementation (the same gradients as `plain`, faster
and with memory linear in depth; the rungs trained before it existed ran
`plain`, as their manifest configs say). scripts/train_ladder.sh trains and
exports every rung; checkpoints/manifest.json records what each took.
"""

from dnl_zoo.config import ConfigDict, base_config


def get_config():
    config = base_config()
    config.model.name = "dnl_conv_n8"
    config.model.overrides = ConfigDict(dict(implementation="lean"))
    config.dataset.name = "fashion_mnist"
    config.batch_size = 128
    config.num_epochs = 6.0
    config.optimizer.learning_rate = 0.1
    config.schedule.warmup_epochs = 0.3
    config.log_every_steps = 100
    config.checkpoint.update(every_steps=200, keep=2)
    config.progress_bar = False
    return config
