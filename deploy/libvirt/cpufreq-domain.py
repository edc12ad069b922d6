#!/usr/bin/env python3
"""Add the vhost-user cpufreq device, on the service's one shared socket, to a libvirt domain.

    cpufreq-domain.py [--socket PATH] [FILE]        FILE (default stdin) -> stdout
        virsh dumpxml NAME | cpufreq-domain.py | virsh define /dev/stdin
    onDefineDomain --vmi JSON --domain XML           KubeVirt's hook sidecar (sidecar-shim): prints the new XML

The same three additions for every domain (domain-snippet.xml shows them in a
whole domain); the service tells the VMs apart by the -name and -smp libvirt
gives QEMU, so nothing here names the VM:

* guest RAM shareable with the back-end: <memoryBacking> gets
  <access mode='shared'/> and, unless it has hugepages or a source already,
  <source type='memfd'/> (an anonymous source becomes memfd; NUMA cells with
  memAccess get "shared");
* a PCI bridge of libvirt's own for the device, with the user alias
  "ua-vucpufreq" (q35: a dmi-to-pci-bridge, which sits on the root bus, so
  QEMU creates it before any root port; the pc machine: a pci-bridge), at the
  next free controller index, and the device in its last slot (0x1f).
  libvirt does not know the device: given no bus it would take the root
  bus's first free slot and collide with the next device libvirt places
  there; behind a root port of our own, libvirt puts its next PCIe device
  (a new domain's USB controller) on that port.  Should libvirt ever place
  a conventional PCI device on the bridge it takes the lowest free slot;
* in <qemu:commandline> (libvirt has no element for this device; the domain
  is marked "tainted: custom-argv"), the chardev on the socket and the device
  on that controller.  The -device is in JSON: QEMU creates JSON -device
  options in order after the key=value ones, and libvirt writes its own in
  JSON, so a key=value one would be created before the controller exists.

Idempotent: a domain that has the chardev "vucpufreq" is printed unchanged.
Python 3's standard library only (KubeVirt's sidecar-shim image has it).
"""

from __future__ import annotations

import argparse
import json
import sys
import xml.etree.ElementTree as ET

QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"
SOCKET = "/run/vhost-user-cpufreq/vhost.sock"
ALIAS = "ua-vucpufreq"
ID = "vucpufreq"
#: the bridge's last slot: libvirt fills a bridge's slots from 1 up with conventional PCI devices it places
SLOT = "0x1f"
#: virtio-id 38: an id QEMU 10.2+ accepts that no device model uses; one request queue; 256 bytes of config
DEVICE = {"driver": "vhost-user-test-device-pci", "id": ID, "chardev": ID, "virtio-id": 38, "num_vqs": 1,
          "vq_size": 256, "config_size": 256}


class DomainError(ValueError):
    """The input is not a libvirt domain this can add the device to."""


def _child(parent: ET.Element, tag: str, **attrib: str) -> ET.Element:
    found = parent.find(tag)
    if found is None:
        found = ET.SubElement(parent, tag, attrib)
    return found


def _shared_memory(root: ET.Element) -> None:
    mb = _child(root, "memoryBacking")
    source = mb.find("source")
    if source is None and mb.find("hugepages") is None:
        ET.SubElement(mb, "source", type="memfd")
    elif source is not None and source.get("type") == "anonymous":
        source.set("type", "memfd")
    _child(mb, "access").set("mode", "shared")
    for cell in root.iterfind("cpu/numa/cell"):
        if cell.get("memAccess") is not None:
            cell.set("memAccess", "shared")


def _controller(root: ET.Element) -> None:
    """A PCI bridge of libvirt's own for the device, added unless the domain has it."""
    devices = _child(root, "devices")
    pci = [c for c in devices.iterfind("controller") if c.get("type") == "pci"]
    if any(c.find(f"alias[@name='{ALIAS}']") is not None for c in pci):
        return
    ostype = root.find("os/type")
    q35 = ostype is not None and "q35" in ostype.get("machine", "")
    try:
        index = max((int(c.get("index", "0")) for c in pci), default=0) + 1
    except ValueError:
        raise DomainError("a PCI controller has an index that is not a number") from None
    ctl = ET.SubElement(devices, "controller", type="pci", index=str(index),
                        model="dmi-to-pci-bridge" if q35 else "pci-bridge")
    ET.SubElement(ctl, "alias", name=ALIAS)


def add_device(xml: str, socket: str = SOCKET) -> str:
    """``xml`` (a libvirt domain) with the cpufreq device on ``socket``; unchanged if it has it."""
    ET.register_namespace("qemu", QEMU_NS)
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as exc:
        raise DomainError(f"not XML: {exc}") from None
    if root.tag != "domain":
        raise DomainError(f"not a libvirt domain: the root element is <{root.tag}>")
    cmd = root.find(f"{{{QEMU_NS}}}commandline")
    if cmd is not None and any(f"id={ID}," in a.get("value", "")
                               for a in cmd.iterfind(f"{{{QEMU_NS}}}arg")):
        return xml
    if "," in socket:
        raise DomainError(f"the socket path {socket!r} has a comma, which QEMU's option syntax would split")
    _shared_memory(root)
    _controller(root)
    if cmd is None:
        cmd = ET.SubElement(root, f"{{{QEMU_NS}}}commandline")
    device = {**DEVICE, "bus": ALIAS, "addr": SLOT}
    for value in ("-chardev", f"socket,id={ID},path={socket}", "-device", json.dumps(device, separators=(",", ":"))):
        ET.SubElement(cmd, f"{{{QEMU_NS}}}arg", value=value)
    ET.indent(root, "  ")
    return ET.tostring(root, encoding="unicode") + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("file", nargs="?", help="the domain XML (default: stdin)")
    p.add_argument("--socket", default=SOCKET, help=f"the service's shared socket (default {SOCKET})")
    p.add_argument("--domain", help="the domain XML itself (KubeVirt's onDefineDomain)")
    p.add_argument("--vmi", help="the VMI as JSON (KubeVirt's onDefineDomain; not needed)")
    args, _ = p.parse_known_args(argv)  # later sidecar-shim versions may pass more
    if args.domain is not None:
        xml = args.domain
    elif args.file:
        with open(args.file) as f:
            xml = f.read()
    else:
        xml = sys.stdin.read()
    try:
        sys.stdout.write(add_device(xml, args.socket))
    except DomainError as exc:
        print(f"cpufreq-domain: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
