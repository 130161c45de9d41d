"""``python -m mvcompile.train`` / ``torchrun -m mvcompile.train``: the train command."""

from mvcompile.train.cli import train

if __name__ == "__main__":
    train(prog_name="mvcompile train")
