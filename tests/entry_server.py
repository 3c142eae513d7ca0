"""Runs the project's entry points (``main.py``, ``python -m tools.export`` ...) as forked children of one process
that has imported the third-party libraries once: each child is a real process with its own exit status, stdout,
stderr and DataLoader workers, and imports our modules afresh as ``python main.py`` would, without paying the import
of torch, torchvision and timm again (2-4 s per process on 2 quiet cores, about 20 s on a loaded machine).

Started by ``tests.helpers.EntryPoints`` as ``python tests/entry_server.py``. It imports nothing of this repository:
module state our code sets at import (``logger.MAIN_PID``, the timm registrations) belongs to each child. One JSON
request per line on stdin (``argv``, ``stdout``, ``stderr``: the command and the files for its output); for each, one
line with the child's ``pid`` and, once it has ended, one with its ``returncode`` (as ``subprocess``'s: minus the
signal that ended it)."""
import gc
import importlib
import json
import os
import runpy
import sys

# The third-party libraries the entry points import (scipy.optimize: the detectors' matching; torchmetrics: the
# segmentation metrics); torch, torchvision (with torch._dynamo) and timm take most of the time.
PRELOAD = ("numpy", "PIL.Image", "scipy.optimize", "yaml", "torch", "torchvision", "timm", "torchmetrics")


def run_child(request: dict) -> None:
    """In the forked child: its output to the requested files (the server's pipes are no longer open in it), then
    the entry point as ``__main__``. Its end (an exception, ``sys.exit``) leaves this function and ends the process
    as it ends ``python main.py``."""
    for fd, target in ((0, os.devnull), (1, request["stdout"]), (2, request["stderr"])):
        opened = os.open(target, os.O_RDONLY if fd == 0 else os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(opened, fd)
        os.close(opened)
    argv = request["argv"]
    if argv[0] == "-m":  # python -m MODULE: the working directory first on the path
        sys.path[0] = os.getcwd()
        sys.argv = argv[1:]
        runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
    else:  # python SCRIPT: the script's folder first on the path
        sys.path[0] = os.path.dirname(os.path.abspath(argv[0]))
        sys.argv = list(argv)
        runpy.run_path(argv[0], run_name="__main__")


def serve() -> None:
    for name in PRELOAD:
        importlib.import_module(name)
    # What the imports made stays out of the children's garbage collections: their exit (which runs in full, as
    # any process's) then touches far fewer inherited pages, 1.5 s instead of 5 s each on a loaded machine.
    gc.freeze()
    for line in sys.stdin:
        pid = os.fork()
        if pid == 0:
            run_child(json.loads(line))
            return  # the entry point returned: the child exits with status 0
        os.write(1, (json.dumps({"pid": pid}) + "\n").encode())
        _, status = os.waitpid(pid, 0)
        os.write(1, (json.dumps({"returncode": os.waitstatus_to_exitcode(status)}) + "\n").encode())


if __name__ == "__main__":
    serve()
