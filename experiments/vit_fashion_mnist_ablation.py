r"""ViT on FashionMNIST: what each change of the long recipe gives, on valid.

Command:   nice -n 19 hw2jax vit ablate --config experiments/vit_fashion_mnist_ablation.py \
             --workdir runs/vit_ablation --host-devices auto
Expected:  (experiments/results/vit_fashion_mnist_ablation/, one seed each) the recipe
           90.28 % best valid, adam_l2 89.48 % (-0.80 points), constant_lr 87.32 % (-2.96),
           no_clipping 89.76 % (-0.52), no_erasing 90.30 % (+0.02), no_flips 90.42 % (+0.14),
           no_label_smoothing 90.10 % (-0.18), no_shifts 90.90 % (+0.62).
           Eight runs of 20 epochs: about
           34-45 min each on 2 CPU cores with 2 host devices; the strong recipe's 30 epochs took
           74 s on one H100.

The recipe is experiments/vit_fashion_mnist_long.py at 20 epochs; each variant undoes one of its
changes from the assignment's recipe. Runs train one after another in their own work dirs under
the workdir and compare on the 5,000 held-out training images; test is not read (read_test is
False). Stopped, the same command resumes where it was; at the end it writes ablation.md and
ablation.json with each run's best valid accuracy and its difference from the recipe's. A short
schedule favours the variants with less regularisation, so read the table as a ranking of the
changes at 20 epochs, not as their worth at 60.
"""

import ml_collections
import vit_fashion_mnist_long


def get_config() -> ml_collections.ConfigDict:
    c = vit_fashion_mnist_long.get_config()  # differs from the long recipe only here
    c.epochs = 20
    c.read_test = False
    c.ablation = {
        "no_erasing": "augment_erase=0.0",
        "no_flips": "augment_flip=False",
        "no_shifts": "augment_pad=0",
        "no_label_smoothing": "label_smoothing=0.0",
        "no_clipping": "grad_clip_norm=0.0",
        "constant_lr": "schedule=constant warmup_epochs=0.0",
        "adam_l2": "optimizer=adam_l2 learning_rate=1e-3 weight_decay=1e-4",
    }
    return c
