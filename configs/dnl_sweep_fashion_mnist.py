"""One member of the dense non-local (DNL) depth sweep on Fashion-MNIST.

    dnl-zoo train --config configs/dnl_sweep_fashion_mnist.py --workdir runs/n8 \
        --config.model.name=dnl_conv_n8

The sweep trains dnl_conv_n{N} (h = T/N), dnl_conv_n{N}_h1 (h = 1) and
dnl_nonlocal_n{N} for N in {2, 4, 8, 16, 32} with this one recipe: batch 128,
SGD with Nesterov momentum, cosine decay over 10 epochs, crop and flip. Not yet
run by this project.
"""

from dnl_zoo.config import base_config


def get_config():
    config = base_config()
    config.model.name = "dnl_conv_n8"
    config.dataset.name = "fashion_mnist"
    config.batch_size = 128
    config.num_epochs = 10.0
    config.optimizer.learning_rate = 0.1
    config.schedule.warmup_epochs = 0.5
    config.regulariser.update(alpha=0.0, beta=0.0)
    config.checkpoint.every_steps = 1000
    return config
