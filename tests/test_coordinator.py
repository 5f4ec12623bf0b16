"""A single-host run's JAX coordination service listens on loopback only (it is unauthenticated)."""

import ipaddress
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]

# Runs main's initialisation, then lists the TCP sockets this process listens on, from
# /proc/net/tcp{,6} (state 0A) matched to the socket inodes of its own file descriptors.
PROBE = r"""
import os, sys
from absl import flags
from clip_jax import distributed, main
flags.FLAGS(["main", "--config=configs/demo.py", "--workdir=unused"])
distributed.initialize()
inodes = set()
for fd in os.listdir("/proc/self/fd"):
    try:
        target = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        continue
    if target.startswith("socket:["):
        inodes.add(target[8:-1])
for table in ("/proc/net/tcp", "/proc/net/tcp6"):
    for line in open(table).read().splitlines()[1:]:
        fields = line.split()
        if fields[3] == "0A" and fields[9] in inodes:
            print("LISTEN", fields[1])
"""


def address_of(hex_address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """/proc/net/tcp's hex address (32-bit words in host byte order) as an IP address."""
    host = hex_address.split(":")[0]
    words = [bytes.fromhex(host[i : i + 8])[::-1] for i in range(0, len(host), 8)]
    return ipaddress.ip_address(b"".join(words))


def is_loopback(address) -> bool:
    mapped = getattr(address, "ipv4_mapped", None)  # ::ffff:127.0.0.1
    return address.is_loopback or (mapped is not None and mapped.is_loopback)


def test_single_host_coordinator_listens_on_loopback_only():
    env = {"JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
    out = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    listening = [line.split()[1] for line in out.stdout.splitlines() if line.startswith("LISTEN")]
    assert listening, out.stdout  # the coordinator is there
    for hex_address in listening:
        address = address_of(hex_address)
        assert is_loopback(address), f"the coordinator listens on {address} (not loopback)"
