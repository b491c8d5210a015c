"""A fork server for fuzzing the helper: one `python3 -I -S` process that has imported
the helper from the rig's root-owned copy, exactly as mep-privhelper runs, and forks a
fresh helper for every connection it is handed. Forking instead of exec'ing brings a
case from ~40 ms to a few.

    forkserver.py CODE_DIR POLICY FD     FD: the control socket (tests/rigs/helper.py ForkServer)

Protocol on the control socket (a SOCK_SEQPACKET pair): the test sends one byte with the
helper's end of a fresh socketpair (SCM_RIGHTS); the server answers with the child's
wait status as 4 bytes, big-endian, once that helper has exited. The byte chooses what
the child runs:

    b"m"  the helper's whole entry point, main(["--policy", P, "--fd", N]): trusted-path
          checks, policy and key loaded, fds closed, then the monitor loop;
    b"r"  only the monitor loop, Monitor(conn, policy, key).run(), with the policy and
          key this server loaded once through the same functions (the frames under test
          meet exactly the same code; the set-up is what is skipped).

Children log to the server's stderr, in order, since cases run one at a time.
"""

import logging
import os
import socket
import struct
import sys

code_dir, policy_path, control_fd = sys.argv[1], sys.argv[2], int(sys.argv[3])
sys.path.insert(0, code_dir)
from privhelper.__main__ import main  # noqa: E402
from privhelper import activation, launch, monitor, policy  # noqa: E402,F401 - what main() imports, once

logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="mep-privhelper[%(process)d] %(levelname)s %(message)s")
loaded = policy.load_policy(policy_path)
key = policy.read_key(loaded)
control = socket.socket(fileno=control_fd)
while True:
    try:
        mode, fds, _, _ = socket.recv_fds(control, 1, 1)
    except (ConnectionResetError, EOFError):
        break
    if not fds:  # the test closed its end
        break
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        control.close()
        try:
            if mode == b"m":
                code = main(["--policy", policy_path, "--fd", str(fds[0])])
            else:
                code = monitor.Monitor(activation.unix_stream(fds[0]), loaded, key).run()
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        except BaseException:  # noqa: BLE001 - report as the crash it is
            import traceback
            traceback.print_exc()
            code = 99
        sys.stderr.flush()
        os._exit(code)
    os.close(fds[0])
    _, status = os.waitpid(pid, 0)
    control.send(struct.pack(">i", status))
