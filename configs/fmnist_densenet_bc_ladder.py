"""The shipped Fashion-MNIST DenseNet-BC ladder: one recipe, four depths.

    dnl-zoo train --config configs/fmnist_densenet_bc_ladder.py \
        --workdir runs/ladder/densenet_bc40_k12_fmnist \
        --config.model.name=densenet_bc40_k12_fmnist

densenet_bc{16,22,28,40}_k12_fmnist: DenseNet-BC, k = 12, CIFAR stem, 28x28
greyscale. Batch 128, SGD with Nesterov momentum 0.9, weight decay 1e-4,
learning rate 0.1 with a 0.3-epoch warm-up and cosine decay over 8 epochs,
random crop (2-pixel padding) and horizontal flip. scripts/train_ladder.sh
trains and exports every rung; checkpoints/manifest.json records what each took.
"""

from dnl_zoo.config import base_config


def get_config():
    config = base_config()
    config.model.name = "densenet_bc40_k12_fmnist"
    config.dataset.name = "fashion_mnist"
    config.batch_size = 128
    config.num_epochs = 8.0
    config.optimizer.learning_rate = 0.1
    config.schedule.warmup_epochs = 0.3
    config.log_every_steps = 100
    config.checkpoint.update(every_steps=200, keep=2)
    config.progress_bar = False
    return config
