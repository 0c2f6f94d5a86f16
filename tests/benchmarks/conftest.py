"""The benchmarks start nginx and load the machine for minutes: keep them out of `pytest`."""

collect_ignore_glob = ["*"]
