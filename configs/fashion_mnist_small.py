"""A small densely connected network on Fashion-MNIST that trains in minutes on a CPU.

    dnl-zoo train --config configs/fashion_mnist_small.py --workdir runs/fmnist_small

dnl_conv_n2: a dense non-local (DNL) network with the local 3x3 transform, 3
blocks of 2 layers, k=12, h = T/2 (37,450 parameters). Batch 128, SGD with
Nesterov momentum 0.9, weight decay 1e-4, learning rate 0.1 with a short warm-up
and cosine decay, 5 epochs, random crop (2-pixel padding) and flip.
Measured by benchmarks/fashion_mnist_small.sh: see the README.
"""

from dnl_zoo.config import base_config


def get_config():
    config = base_config()
    config.model.name = "dnl_conv_n2"
    config.dataset.name = "fashion_mnist"
    config.batch_size = 128
    config.num_epochs = 5.0
    config.optimizer.learning_rate = 0.1
    config.schedule.warmup_epochs = 0.2
    config.log_every_steps = 100
    config.checkpoint.every_steps = 200
    return config
