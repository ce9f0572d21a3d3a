"""cnncodes' pipelines: the CLI and everything built on cached CNN codes."""
