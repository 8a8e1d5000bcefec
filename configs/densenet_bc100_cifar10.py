"""DenseNet-BC L=100, k=12 on CIFAR-10 with the published recipe.

    dnl-zoo train --config configs/densenet_bc100_cifar10.py --workdir runs/bc100

Huang et al. (2017): SGD with Nesterov momentum 0.9, weight decay 1e-4, batch
64, learning rate 0.1 divided by 10 at 50% and 75% of 300 epochs, random crop
with 4-pixel padding and horizontal flip. Published C10+ error: 4.51%. Not yet
run by this project (it needs an accelerator: about 1.5 days of this recipe on a
2-core CPU).
"""

from dnl_zoo.config import base_config


def get_config():
    config = base_config()
    config.model.name = "densenet_bc100_k12"
    config.dataset.name = "cifar10"
    config.batch_size = 64
    config.num_epochs = 300.0
    config.optimizer.update(
        name="sgd", learning_rate=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4
    )
    config.schedule.update(name="step", boundaries=(0.5, 0.75), decay_factor=0.1)
    config.eval_batch_size = 1000
    config.checkpoint.every_steps = 5000
    return config
