"""One member of the dense non-local (DNL) depth sweep on Fashion-MNIST.

    dnl-zoo train --config configs/dnl_sweep_fashion_mnist.py --workdir runs/n8 \
        --config.model.name=dnl_conv_n8

`dnl-zoo reproduce depth-table --train` trains dnl_conv_n{N} (h = T/N) and
dnl_conv_n{N}_h1 (h = 1) with this one recipe: batch 128, SGD with Nesterov
momentum on the fields (optimizer.field_metric: each weight's learning rate
divided by its quadrature weight, h^2 for K(t, s) and h for G(t); see
dnl_zoo.depth.field_metric_scales), cosine decay over 10 epochs, crop and flip.
For h = 1 the factors are all 1: the contrast family is plain SGD. Without the
field metric the h = T/N networks learn slower the deeper they are (every read
of x_j carries h), and at a fixed budget their training loss rises with N.
The budget (`--budget quick|full`) sets depths, steps and batch.
"""

from dnl_zoo.config import base_config


def get_config():
    config = base_config()
    config.model.name = "dnl_conv_n8"
    config.dataset.name = "fashion_mnist"
    config.batch_size = 128
    config.num_epochs = 10.0
    config.optimizer.learning_rate = 0.1
    config.optimizer.field_metric = True
    config.schedule.warmup_epochs = 0.5
    config.regulariser.update(alpha=0.0, beta=0.0)
    config.checkpoint.every_steps = 1000
    return config
