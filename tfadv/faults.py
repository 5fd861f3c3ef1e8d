"""Fault injection for the reliability tests (tests/test_reliability.py): named points where a run
can be made to die or fail, the way etcd's and TiKV's failpoints work.

``TFADV_FAULT='<point>[@<n>]:<action>[,...]'`` makes the n-th time (default 1st) execution passes
``failpoint('<point>')`` do ``<action>``: ``kill`` (SIGKILL: no cleanup, no flush, as a power cut
or the OOM killer would), ``enospc`` (an OSError "No space left on device", as a full disk
would) or ``interrupt`` (KeyboardInterrupt, as Ctrl-C would; for in-process tests). Unset
(always, outside the tests), a failpoint costs one dictionary lookup."""

import errno
import os
import signal

_hits = {}


def reset():
    """Forgets how often each point was passed (in-process tests run several runs)."""
    _hits.clear()


def failpoint(name):
    """The failpoint called ``name``. Without ``TFADV_FAULT`` it returns at once. Otherwise it
    counts this pass and, when ``TFADV_FAULT`` names the point for this pass (module docstring),
    does its action: ``kill`` sends SIGKILL to this process, ``enospc`` raises OSError(ENOSPC),
    ``interrupt`` raises KeyboardInterrupt."""
    spec = os.environ.get("TFADV_FAULT")
    if not spec:
        return
    _hits[name] = _hits.get(name, 0) + 1
    for item in spec.split(","):
        point, _, action = item.rpartition(":")
        point, _, nth = point.partition("@")
        if point == name and _hits[name] == int(nth or 1):
            if action == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            if action == "interrupt":
                raise KeyboardInterrupt(f"injected at {name}")
            if action == "enospc":
                raise OSError(errno.ENOSPC, f"No space left on device (injected at {name})")
