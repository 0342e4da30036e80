"""One torchrun worker: run a `bagel` command and record its exit code for `bagel.platform.launch.node`.

torchrun exits with 1 whenever a worker fails, whatever the worker's exit
code, so the trainer's PREEMPTED (75), USAGE_ERROR (2) and DIVERGED (3) would be lost. Each
worker therefore writes its exit code to `$BAGEL_EXIT_CODE_DIR/rank-$RANK`,
and the node entry point exits with the codes that matter.

    python -m bagel.platform.launch.rank [--script PATH] ARGS...

runs `bagel ARGS...` in this process (like `python -m bagel.platform ARGS...`),
or the Python file PATH with ARGS as its sys.argv[1:].
"""

import os
import runpy
import sys


def _run(argv: list[str]) -> int:
    if argv[:1] == ["--script"]:
        if len(argv) < 2:
            print("--script needs a PATH", file=sys.stderr)
            return 2
        sys.argv = [argv[1], *argv[2:]]
        try:
            runpy.run_path(argv[1], run_name="__main__")
        except SystemExit as exit_:
            return _code(exit_.code)
        return 0
    from bagel.platform.cli import main

    try:
        return int(main(argv) or 0)
    except SystemExit as exit_:
        return _code(exit_.code)


def _code(value: object) -> int:
    if value is None:
        return 0
    if isinstance(value, int):
        return value
    print(value, file=sys.stderr)
    return 1


def main() -> None:
    code = 1
    try:
        code = _run(sys.argv[1:])
    finally:
        directory = os.environ.get("BAGEL_EXIT_CODE_DIR")
        if directory:
            # Written on exceptions too (code stays 1), so the node never mistakes a crash for success.
            with open(os.path.join(directory, f"rank-{os.environ.get('RANK', '0')}"), "w") as handle:
                handle.write(str(code))
    sys.exit(code)


if __name__ == "__main__":
    main()
