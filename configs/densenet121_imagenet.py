"""DenseNet-121 on ImageNet (ILSVRC 2012) with the paper's recipe.

    dnl-zoo train --config configs/densenet121_imagenet.py --workdir runs/d121

Needs the manual TFDS download of imagenet2012 (see `dnl-zoo data --help`).
Huang et al. (2017): batch 256, SGD with Nesterov momentum, weight decay 1e-4,
learning rate 0.1 divided by 10 at epochs 30 and 60 of 90. Published single-crop
top-1 error: 25.02%. Not yet run by this project.
"""

from dnl_zoo.config import base_config


def get_config():
    config = base_config()
    config.model.name = "densenet121"
    config.dataset.name = "imagenet2012"
    config.batch_size = 256
    config.num_epochs = 90.0
    config.optimizer.update(learning_rate=0.1, weight_decay=1e-4, nesterov=True)
    config.schedule.update(name="step", boundaries=(1 / 3, 2 / 3), decay_factor=0.1)
    config.eval_batch_size = 256
    config.log_every_steps = 100
    config.checkpoint.every_steps = 2000
    return config
