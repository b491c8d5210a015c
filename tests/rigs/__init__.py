"""The test rigs, by layer; each builds real things (accounts, processes, queues), never mocks.

    procs.py      processes as /proc shows them: the one `wait_for`, the one `alive`, wait_gone, reap, strace holds
    accounts.py   mept- users, groups and PAM services, and `cleanup()` of everything mept-
    helper.py     the root-owned rig directory (RigDir: policies, key, probe, the code the helper runs),
                  the helper as a process, the protocol Client, --launch with testbroker.py, the fuzz ForkServer
    mep.py        a live MEP (LiveMEP: helper --launch, broker, RabbitMQ queue, probe UEPs) and its commands
    service.py    the local compute service, a MEP registered with it, the real SDK as the user
    upstream.py   upstream's own MEP against the local service
    slurm.py      a single-node Slurm cluster

testbroker.py and forkserver.py are programs the rigs run, not modules to import.
"""
