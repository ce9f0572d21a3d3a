"""``python -m cnncodes.pipelines.cli`` is the ``cnncodes`` command."""
from cnncodes.pipelines.cli import main

if __name__ == "__main__":
    main()
