"""``python -m cnncodes`` (and ``torchrun ... -m cnncodes``) is the ``cnncodes`` command."""
from cnncodes.pipelines.cli import main

if __name__ == "__main__":
    main()
