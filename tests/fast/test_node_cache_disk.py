"""infra/aws/node-cache-disk.sh (the node cache on the instance-store NVMe): its decisions on the
disks an instance type has, run in dry-run mode with the probes of the machine replaced."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "infra" / "aws" / "node-cache-disk.sh"
P4D = [f"/dev/nvme{i}n1" for i in range(1, 9)]


def plan(devices=(), mounted="", ami_mount="", labelled="", members=False, failing="") -> list[str]:
    """The lines the script says and the commands it would run (`+ ...`), on a machine with
    these instance-store `devices`; `mounted`: what is mounted at the cache folder already;
    `ami_mount`: where the AMI mounted the first device; `labelled`: the device holding a
    filesystem labelled pipeline-cache (a reboot); `members`: the disks carry an array's
    superblock; `failing`: the command that fails."""
    first = devices[0] if devices else ""
    fakes = f"""
        set -euo pipefail
        source {SCRIPT}
        DRY_RUN=1
        CACHE_MOUNT=/mnt/pipeline-cache
        instance_store_devices() {{ printf '%s\\n' {' '.join(devices)}; }}
        mounted_source() {{ echo "{mounted}"; }}
        mount_point_of() {{ if [ "$1" = "{first}" ]; then echo "{ami_mount}"; fi; }}
        is_array_member() {{ {'true' if members else 'false'}; }}
        ASSEMBLED=
        labelled_device() {{
            if [ -n "{labelled}" ]; then echo "{labelled}"; elif [ -n "$ASSEMBLED" ]; then echo /dev/md127; fi
        }}
        run() {{
            echo "+ $*"
            if [ "$1 ${{2:-}}" = "mdadm --assemble" ]; then ASSEMBLED=1; fi
            if [ -n "{failing}" ] && [ "$1" = "{failing}" ]; then return 1; fi
            return 0
        }}
        setup
    """
    out = subprocess.run(["bash", "-c", fakes], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return [line.replace("  ", " ") for line in out.stdout.splitlines() if line.strip()]


def commands(lines: list[str]) -> list[str]:
    return [line[2:] for line in lines if line.startswith("+ ")]


def test_no_instance_store_keeps_the_root_volume_with_a_warning():
    lines = plan([])
    assert lines[0].startswith("[cache] warning: no instance-store NVMe on this instance type")
    assert commands(lines) == ["mkdir -p /mnt/pipeline-cache", "chmod 1777 /mnt/pipeline-cache"]


def test_one_disk_is_formatted_and_mounted():   # g5.*: one NVMe
    got = commands(plan(["/dev/nvme1n1"]))
    assert got == [
        "mkfs.ext4 -q -F -m 0 -L pipeline-cache -E lazy_itable_init=1,nodiscard /dev/nvme1n1",
        "mkdir -p /mnt/pipeline-cache",
        "mount -o noatime /dev/nvme1n1 /mnt/pipeline-cache",
        "chmod 1777 /mnt/pipeline-cache",
        "fstab: LABEL=pipeline-cache /mnt/pipeline-cache ext4 defaults,noatime,nofail 0 2"]


def test_eight_disks_become_one_raid0_array():   # p4d.24xlarge
    got = commands(plan(P4D))
    assert got[0] == ("mdadm --create /dev/md/pipeline-cache --run --level=0 --raid-devices=8 "
                      "--name=pipeline-cache " + " ".join(P4D))
    assert got[1].startswith("mkfs.ext4 ") and got[1].endswith(" /dev/md/pipeline-cache")
    assert "mount -o noatime /dev/md/pipeline-cache /mnt/pipeline-cache" in got


def test_already_mounted_changes_nothing():
    lines = plan(P4D, mounted="/dev/md127")
    assert lines == ["[cache] /mnt/pipeline-cache is already mounted (/dev/md127): nothing to do"]


@pytest.mark.parametrize("devices, labelled", [(["/dev/nvme1n1"], "/dev/nvme1n1"),
                                               (P4D, "/dev/md127")])   # the kernel assembled it
def test_after_a_reboot_the_filesystem_is_mounted_not_formatted(devices, labelled):
    got = commands(plan(devices, labelled=labelled))
    assert not [c for c in got if c.startswith(("mkfs", "mdadm"))]
    assert f"mount -o noatime {labelled} /mnt/pipeline-cache" in got


def test_after_a_reboot_an_array_is_assembled_not_created():
    got = commands(plan(P4D, members=True))
    assert got[0] == "mdadm --assemble --scan"
    assert not [c for c in got if c.startswith(("mkfs", "mdadm --create"))]
    assert "mount -o noatime /dev/md127 /mnt/pipeline-cache" in got


def test_a_disk_the_ami_mounted_is_kept_and_bind_mounted():   # Deep Learning AMIs
    lines = plan(["/dev/nvme1n1"], ami_mount="/opt/dlami/nvme")
    assert commands(lines) == ["mkdir -p /opt/dlami/nvme/pipeline-cache /mnt/pipeline-cache",
                               "chmod 1777 /opt/dlami/nvme/pipeline-cache",
                               "mount --bind /opt/dlami/nvme/pipeline-cache /mnt/pipeline-cache"]


@pytest.mark.parametrize("failing", ["mkfs.ext4", "mdadm", "mount"])
def test_a_failure_leaves_the_node_starting_on_the_root_volume(failing):
    lines = plan(P4D, failing=failing)
    assert "[cache] warning: setting up the instance store failed (see above)" in lines
    assert lines[-2:] == ["+ mkdir -p /mnt/pipeline-cache", "+ chmod 1777 /mnt/pipeline-cache"]


def test_the_script_parses_and_passes_shellcheck():
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0
    if shutil.which("shellcheck"):   # not installed by `make install`; checked where it is
        out = subprocess.run(["shellcheck", str(SCRIPT)], capture_output=True, text=True)
        assert out.returncode == 0, out.stdout
