#!/usr/bin/env bash
# The node's shard cache on its instance-store NVMe. cluster.yaml runs this on each node's host
# (initialization_commands) before Docker starts; the container bind-mounts $CACHE_MOUNT and
# PIPELINE_CACHE_DIR points there.
#
# - Several instance-store disks (p4d.24xlarge: 8 x 1 TB) become one RAID0 array; one disk
#   (g5.xlarge .. g5.16xlarge: 1) is used as it is.
# - It is formatted only when it holds no filesystem labelled pipeline-cache, mounted at
#   $CACHE_MOUNT, and listed in /etc/fstab (nofail) so a reboot mounts it again; after a
#   reboot an array is assembled again, never created anew. Running this again changes nothing.
# - An AMI that mounts the instance store itself (the Deep Learning AMIs: /opt/dlami/nvme) keeps
#   its mount: the cache is a folder there, bind-mounted at $CACHE_MOUNT.
# - An instance type without instance store (m6i, c6i: the head and the stagers) keeps the cache
#   on the root volume, with a warning.
#
#   sudo bash infra/aws/node-cache-disk.sh [--dry-run]     --dry-run: say the commands, run none
# Instance-store data is lost when the instance stops or terminates: the cache is only a cache.
set -euo pipefail

CACHE_MOUNT=${CACHE_MOUNT:-/mnt/pipeline-cache}
LABEL=pipeline-cache
ARRAY=/dev/md/$LABEL
DRY_RUN=${DRY_RUN:-0}

say() { echo "[cache] $*"; }

run() {
    if [ "$DRY_RUN" = 1 ]; then echo "+ $*"; else "$@"; fi
}

# -- what the machine has (tests replace these functions) -------------------------------------------
instance_store_devices() {
    # by-id names stay the same whatever order the kernel numbered the disks in; the model name
    # is the fallback where udev made no such links
    {
        for link in /dev/disk/by-id/nvme-Amazon_EC2_NVMe_Instance_Storage_*; do
            if [ -e "$link" ] && [[ $link != *-part* ]]; then readlink -f "$link"; fi
        done
        lsblk -dnpo NAME,MODEL 2>/dev/null | awk '/Amazon EC2 NVMe Instance Storage/ {print $1}'
    } | sort -u
}
mounted_source() { findmnt -no SOURCE --mountpoint "$1" 2>/dev/null || true; }
mount_point_of() { findmnt -no TARGET --source "$1" 2>/dev/null | head -n 1 || true; }
labelled_device() { blkid -L "$LABEL" 2>/dev/null || true; }
is_array_member() { mdadm --examine "$1" >/dev/null 2>&1; }

# -- what to do ------------------------------------------------------------------------------------
root_volume() {
    say "warning: no instance-store NVMe on this instance type: the node cache stays on the root" \
        "volume ($CACHE_MOUNT); a cold node fetches its shards at the root volume's speed"
    run mkdir -p "$CACHE_MOUNT"
    run chmod 1777 "$CACHE_MOUNT"
}

add_to_fstab() {
    local line="LABEL=$LABEL $CACHE_MOUNT ext4 defaults,noatime,nofail 0 2"
    if [ "$DRY_RUN" = 1 ]; then echo "+ fstab: $line"; return; fi
    grep -q "^LABEL=$LABEL " /etc/fstab || echo "$line" >> /etc/fstab
}

main() {
    local source devices dev used disk
    source=$(mounted_source "$CACHE_MOUNT")
    if [ -n "$source" ]; then
        say "$CACHE_MOUNT is already mounted ($source): nothing to do"
        return 0
    fi
    mapfile -t devices < <(instance_store_devices | awk NF)
    if [ "${#devices[@]}" -eq 0 ]; then
        root_volume
        return 0
    fi
    for dev in "${devices[@]}"; do
        used=$(mount_point_of "$dev")
        if [ -n "$used" ]; then
            say "instance store $dev is already mounted at $used (by the AMI): the cache goes" \
                "to $used/pipeline-cache, mounted at $CACHE_MOUNT"
            run mkdir -p "$used/pipeline-cache" "$CACHE_MOUNT" &&
                run chmod 1777 "$used/pipeline-cache" &&
                run mount --bind "$used/pipeline-cache" "$CACHE_MOUNT"
            return
        fi
    done
    if [ "${#devices[@]}" -gt 1 ] && [ -z "$(labelled_device)" ]; then
        command -v mdadm >/dev/null || [ "$DRY_RUN" = 1 ] ||
            { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mdadm; } ||
            return 1
        if is_array_member "${devices[0]}"; then
            say "assembling the RAID0 array of the ${#devices[@]} instance-store disks again"
            run mdadm --assemble --scan
            [ -n "$(labelled_device)" ] || [ "$DRY_RUN" = 1 ] || return 1
        else
            say "one RAID0 array of the ${#devices[@]} instance-store disks: ${devices[*]}"
            run mdadm --create "$ARRAY" --run --level=0 --raid-devices="${#devices[@]}" \
                --name="$LABEL" "${devices[@]}" || return 1
        fi
    fi
    disk=$(labelled_device)
    if [ -z "$disk" ]; then
        if [ "${#devices[@]}" -gt 1 ]; then disk=$ARRAY; else disk=${devices[0]}; fi
        # lazy init and no discard: formatting terabytes of NVMe takes seconds, not minutes
        run mkfs.ext4 -q -F -m 0 -L "$LABEL" -E lazy_itable_init=1,nodiscard "$disk" || return 1
    fi
    run mkdir -p "$CACHE_MOUNT" && run mount -o noatime "$disk" "$CACHE_MOUNT" || return 1
    run chmod 1777 "$CACHE_MOUNT"   # like /tmp: the node cache makes a folder of its user inside
    add_to_fstab
    say "node cache on $disk (${#devices[@]} instance-store NVMe disk(s)) mounted at $CACHE_MOUNT"
}

setup() {
    # a node whose disks cannot be set up still starts, its cache on the root volume
    # (errexit does not hold inside a function called from `if`: main returns 1 itself)
    if ! main; then
        say "warning: setting up the instance store failed (see above)"
        root_volume
    fi
}

if [ "${1:-}" = "--dry-run" ]; then DRY_RUN=1; fi
if [ "${BASH_SOURCE[0]}" = "$0" ]; then setup; fi
