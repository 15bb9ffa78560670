"""`python -m noodle` and the `noodle` command. The CLI is imported here, inside the entry
point, so that a Ctrl-C while it loads ends as one during a command does: one line, exit 130.
"""

from __future__ import annotations

import sys


def run() -> None:
    try:
        from noodle.cli import main
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
    main()


if __name__ == "__main__":
    run()
