"""``python -m mvcompile.train`` / ``torchrun -m mvcompile.train``: the train command."""

from mvcompile.train.cli import train
from mvcompile.verbosity import add_verbose_option, set_verbosity

if __name__ == "__main__":
    set_verbosity(0)
    add_verbose_option(train)
    train(prog_name="mvcompile train")
