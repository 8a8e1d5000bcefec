"""A small DenseNet-BC on Fashion-MNIST that trains in minutes on a CPU.

    dnl-zoo train --config configs/fashion_mnist_small.py --workdir runs/fmnist_small

DenseNet-BC L=40, k=12 (0.18M parameters), batch 128, SGD with Nesterov momentum
and cosine decay, 3 epochs, random crop (2-pixel padding) and flip.
"""

from dnl_zoo.config import base_config


def get_config():
    config = base_config()
    config.model.name = "densenet_bc40_k12"
    config.dataset.name = "fashion_mnist"
    config.batch_size = 128
    config.num_epochs = 3.0
    config.optimizer.learning_rate = 0.1
    config.schedule.warmup_epochs = 0.2
    config.log_every_steps = 100
    config.checkpoint.every_steps = 200
    return config
