#!/usr/bin/env python3
"""CPU used on this machine between two snapshots, by program (bench/postgres.sh PG_STATEMENTS=1).

    bench/cpu.py snapshot FILE     records every process's CPU time and the machine's totals
    bench/cpu.py diff FILE         prints CPU seconds since FILE by program, the machine's busy
                                   seconds (every core) and its idle share

Processes that ended in between (a load generator) are counted in "exited or other": the
machine's busy time minus what the processes alive at both snapshots used.
"""
import json
import os
import sys

TICK = os.sysconf("SC_CLK_TCK")


def snapshot():
    procs = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        comm = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2 :].split()
        # utime, stime, cutime, cstime are fields 14-17 of stat(5); here 11-14 after comm/state.
        procs[pid] = [comm, int(fields[11]) + int(fields[12])]
    with open("/proc/stat") as f:
        cpu = [int(v) for v in f.readline().split()[1:]]
    return {"procs": procs, "busy": sum(cpu) - cpu[3] - cpu[4], "idle": cpu[3] + cpu[4]}


def group(comm):
    for name in ("postgres", "mailgate", "smtp-sink", "smtp-source", "loadgen", "master", "smtpd", "cleanup", "qmgr"):
        if comm.startswith(name) or name in comm:
            return name
    return comm


def main():
    verb, path = sys.argv[1], sys.argv[2]
    if verb == "snapshot":
        with open(path, "w") as f:
            json.dump(snapshot(), f)
        return
    with open(path) as f:
        before = json.load(f)
    after = snapshot()
    used = {}
    for pid, (comm, t) in after["procs"].items():
        t0 = before["procs"].get(pid, [comm, 0])[1] if pid in before["procs"] else 0
        if t - t0 > 0:
            used[group(comm)] = used.get(group(comm), 0) + t - t0
    busy = after["busy"] - before["busy"]
    idle = after["idle"] - before["idle"]
    other = busy - sum(used.values())
    parts = sorted(used.items(), key=lambda kv: -kv[1])
    text = ", ".join(f"{k} {v / TICK:.2f}" for k, v in parts[:6])
    print(f"CPU s: {text}, exited or other {max(other, 0) / TICK:.2f}; machine busy {busy / TICK:.2f}, idle {100 * idle / max(busy + idle, 1):.0f}%")


main()
