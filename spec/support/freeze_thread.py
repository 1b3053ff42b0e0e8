#!/usr/bin/env python3
"""freeze_thread.py TID...: stops just these threads (not their whole process)
with ptrace (PTRACE_SEIZE + PTRACE_INTERRUPT), prints "frozen", and keeps them
stopped until this process ends. Specs use it to wedge one thread of a server,
e.g. its tokio I/O thread, the way a bug would."""
import ctypes
import os
import sys
import time

PTRACE_SEIZE = 0x4206
PTRACE_INTERRUPT = 0x4207
libc = ctypes.CDLL(None, use_errno=True)
for tid in map(int, sys.argv[1:]):
    for request in (PTRACE_SEIZE, PTRACE_INTERRUPT):
        if libc.ptrace(request, tid, None, None) != 0:
            sys.exit(f"ptrace({request:#x}, {tid}): {os.strerror(ctypes.get_errno())}")
print("frozen", flush=True)
while True:
    time.sleep(3600)
