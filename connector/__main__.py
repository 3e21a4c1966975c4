"""`python -m connector` and the `winback` console script.

The command line is imported inside `main`, not here: a worker process that multiprocessing
starts re-imports the script that launched winback, and should not load the whole CLI for it.
"""


def main() -> None:
    from connector.cli import main as run_cli

    run_cli()


if __name__ == "__main__":
    main()
