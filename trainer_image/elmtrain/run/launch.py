"""``elmtrain-torchrun``: torchrun, with the trainer's exit codes.

torchrun exits 1 whenever a worker fails, so a multi-GPU Job would retry bad input (65) and
count a preemption (75) as a crash. This runs torchrun's own launcher with the same arguments
and exits with what the workers said: 2/65 if any rank had bad input, else 1 if any rank failed
otherwise, else 75 if a rank was preempted or stopped by SIGTERM (torchrun stops the other
ranks with it when one exits, and passes the pod's own on).
"""

from __future__ import annotations

import os
import signal
import sys

from elmcore.errors import ExitCode

PERMANENT = (int(ExitCode.USAGE), int(ExitCode.BAD_INPUT))


def exit_code(worker_codes: list[int]) -> int:
    """The Job's exit code from the failed workers' (negative: killed by that signal)."""
    for code in PERMANENT:
        if code in worker_codes:
            return code
    if any(code > 0 and code != ExitCode.TRANSIENT for code in worker_codes):
        return int(ExitCode.INTERNAL)  # a rank's bug; the others were stopped because of it
    stopped = {int(ExitCode.TRANSIENT), -int(signal.SIGTERM)}
    return int(ExitCode.TRANSIENT) if stopped & set(worker_codes) else int(ExitCode.INTERNAL)


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    try:
        run(parse_args(argv if argv is not None else sys.argv[1:]))  # type: ignore[no-untyped-call]
    except ChildFailedError as failed:
        codes = [failure.exitcode for failure in failed.failures.values()]
        code = exit_code(codes)
        print(f"elmtrain-torchrun: workers exited {sorted(codes)}; exit {code}", file=sys.stderr)
        return code
    except SignalException as signalled:
        # The pod's SIGTERM: torchrun passed it to the workers and waited for them to save.
        print(f"elmtrain-torchrun: stopped by signal {signalled.sigval}", file=sys.stderr)
        return int(ExitCode.TRANSIENT)
    return 0


def exit_now(code: int) -> None:
    """Exit with ``code`` without the interpreter's teardown. The workers are gone and the code
    is decided; what is left is torch's native state (the rendezvous store, its threads), whose
    destructors once aborted an evicted node (SIGABRT: -6, a pod failure the Job counts against
    its backoffLimit) after it had decided on 75 (clean-clone CI, test_nodes_gang)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def cli() -> None:
    """The ``elmtrain-torchrun`` console script."""
    exit_now(main())


if __name__ == "__main__":
    cli()
