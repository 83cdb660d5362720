"""The executor's nwfilter: one definition, filled in per VM by the domain's filterref parameters.

It keeps clean-traffic (the VM may only use its own MAC and IP, ARP included, and no frame
other than IPv4 and ARP: IPv6 is dropped at layer 2) and adds destination rules for what the
VM sends (direction "out"), in priority order:

  100 accept  replies on connections that are already established (the executor's SSH)
  200 accept  DNS (UDP and TCP 53) to the host's bridge address ($GATEWAY)
  210 accept  TCP to $GATEWAY on each $HOST_PORT
  220 accept  any protocol to each allowed network ($ALLOW_NET[@1] / $ALLOW_MASK[@1])
  300 drop    anything else to $GATEWAY
  310 drop    any protocol to each blocked network ($BLOCK_NET[@2] / $BLOCK_MASK[@2])

A plain `$VAR` is `$VAR[@0]`, and libvirt walks all variables of one iterator in step, which
needs lists of equal length: $HOST_PORT gets its own iterator (@3), or a second port beside the
single $GATEWAY would make the rule fail to instantiate.
  (everything else, the public internet, passes)

`core.netpolicy.filter_parameters` makes the parameter list in this shape.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET

FILTER_NAME = "lvx-job"


def _rule(parent: ET.Element, action: str, priority: int, protocol: str, **attrs: str) -> None:
    rule = ET.SubElement(parent, "rule", action=action, direction="out", priority=str(priority))
    ET.SubElement(rule, protocol, attrs)


def build_job_filter(name: str = FILTER_NAME) -> str:
    root = ET.Element("filter", name=name, chain="root")
    ET.SubElement(root, "filterref", filter="clean-traffic")
    _rule(root, "accept", 100, "all", state="ESTABLISHED,RELATED")
    _rule(root, "accept", 200, "udp", dstipaddr="$GATEWAY", dstportstart="53")
    _rule(root, "accept", 200, "tcp", dstipaddr="$GATEWAY", dstportstart="53")
    _rule(root, "accept", 210, "tcp", dstipaddr="$GATEWAY", dstportstart="$HOST_PORT[@3]")
    _rule(root, "accept", 220, "all", dstipaddr="$ALLOW_NET[@1]", dstipmask="$ALLOW_MASK[@1]")
    _rule(root, "drop", 300, "all", dstipaddr="$GATEWAY")
    _rule(root, "drop", 310, "all", dstipaddr="$BLOCK_NET[@2]", dstipmask="$BLOCK_MASK[@2]")
    ET.indent(root, space="  ")
    return ET.tostring(root, encoding="unicode") + "\n"


def same_rules(defined_xml: str, wanted_xml: str) -> bool:
    """Whether a filter libvirt holds (with its uuid, maybe its own attribute order) has the
    rules of `wanted_xml`."""

    def canonical(text: str) -> list[tuple[str, dict[str, str], list[tuple[str, dict[str, str]]]]]:
        root = ET.fromstring(text)
        return [(el.tag, dict(el.attrib), [(c.tag, dict(c.attrib)) for c in el]) for el in root if el.tag != "uuid"]

    try:
        return canonical(defined_xml) == canonical(wanted_xml) and ET.fromstring(defined_xml).get("chain") == "root"
    except ET.ParseError:
        return False
